"""One dispatch point per op: ``torch.library`` custom ops that pick a backend (see ``_backend``)."""

from ckakd.ops._backend import BackendStatus, backends, last_dispatch, resolve, track_dispatch
from ckakd.ops.alignment import alignment_stats
from ckakd.ops.gram import centered_gram
from ckakd.ops.patch import patch_alignment_stats

__all__ = [
    "BackendStatus",
    "alignment_stats",
    "backends",
    "centered_gram",
    "last_dispatch",
    "patch_alignment_stats",
    "resolve",
    "track_dispatch",
]
