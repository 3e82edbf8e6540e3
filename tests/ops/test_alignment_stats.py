"""``ckakd::alignment_stats``: the Gram and feature-space forms agree; schema / fake / autograd checks of
the custom ops (``torch.library.opcheck``) on both backends."""

from __future__ import annotations

import torch

import ckakd
from ckakd import reference as R
from ckakd.ops.alignment_stats import alignment_stats
from ckakd.ops.centered_gram import centered_gram

MODES = ["centered", "debiased", "uncentered"]


def test_gram_form_equals_feature_space_form():
    x, y = torch.randn(30, 8, dtype=torch.float64), torch.randn(30, 6, dtype=torch.float64)
    torch.testing.assert_close(R.cka(x, y), R.cka_feature_space(x, y))
    # ckakd's torch path uses the feature-space form here (dx + dy < n) and the Gram form when batched
    # with many features; both must agree with the reference.
    torch.testing.assert_close(ckakd.cka(x, y), R.cka_feature_space(x, y))
    wide = torch.cat([x, torch.randn(30, 40, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(ckakd.cka(wide, y), R.cka_feature_space(wide, y))


def test_opcheck_alignment_and_gram_ops():
    for n, dx, dy in [(6, 5, 4), (20, 3, 2)]:
        for mode in MODES:
            x = torch.randn(2, n, dx, dtype=torch.float64, requires_grad=True)
            y = torch.randn(2, n, dy, dtype=torch.float64, requires_grad=True)
            torch.library.opcheck(alignment_stats, (x, y, mode, "torch"))
    torch.library.opcheck(centered_gram, (torch.randn(2, 5, 7, requires_grad=True), "torch"))


def test_opcheck_triton_path(triton_device):
    x = torch.randn(1, 8, 16, device=triton_device, requires_grad=True)
    y = torch.randn(1, 8, 16, device=triton_device, requires_grad=True)
    torch.library.opcheck(alignment_stats, (x, y, "centered", "triton"), test_utils=("test_schema", "test_faketensor"))
