"""One module per op, named after it: ``torch.library`` custom ops that pick a backend (see ``_backend``) —
``centered_gram``, ``alignment_stats``, ``patch_alignment_stats``, the Sinkhorn ops — and ``sqrtm_psd``
(a ``torch.autograd.Function``); ``_gram_primitives`` holds the Gram primitives they share."""

from ckakd.ops._backend import BackendStatus, backends, last_dispatch, resolve, track_dispatch
from ckakd.ops.alignment_stats import alignment_stats
from ckakd.ops.centered_gram import centered_gram
from ckakd.ops.patch_alignment_stats import patch_alignment_stats
from ckakd.ops.sqrtm_psd import sqrtm_psd

__all__ = [
    "BackendStatus",
    "alignment_stats",
    "backends",
    "centered_gram",
    "last_dispatch",
    "patch_alignment_stats",
    "resolve",
    "sqrtm_psd",
    "track_dispatch",
]
