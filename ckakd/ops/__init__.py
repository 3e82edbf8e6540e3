"""One dispatch point per op: ``torch.library`` custom ops that pick a backend (see ``_backend``)."""

from ckakd.ops._backend import BackendStatus, backends, resolve
from ckakd.ops.alignment import alignment_stats
from ckakd.ops.gram import centered_gram
from ckakd.ops.patch import patch_alignment_stats

__all__ = [
    "BackendStatus",
    "alignment_stats",
    "backends",
    "centered_gram",
    "patch_alignment_stats",
    "resolve",
]
