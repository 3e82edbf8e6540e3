"""Tests of the Triton column-mean kernels (``ckakd.kernels.column_mean``) against float64 formulas.

Without CUDA they run under the Triton CPU interpreter (``TRITON_INTERPRET=1``, set by conftest), so
shapes are small; on a CUDA machine a missing Triton or kernels package fails this module (conftest's
``require_kernels``) instead of skipping it. Every comparison uses float64 of the *same* (rounded) inputs
the kernel saw, and tolerances relative to the scale of the expected result.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.conftest import require_kernels
from tests.kernel_helpers import (
    launch_metas,
    rand_input,
    record_launches,
)

kernels = require_kernels()
column_mean_mod = importlib.import_module("ckakd.kernels.column_mean")


@pytest.mark.parametrize("row_split", [1, 3])
@pytest.mark.parametrize("index", range(len(column_mean_mod.COLUMN_MEAN_CONFIGS)))
def test_column_mean_each_candidate(triton_device, poisoned_empty, monkeypatch, index, row_split):
    """Each column-mean candidate, forced, in one and in three row ranges (then the finishing kernel
    adds the partials); corr = mean - row 0 stays accurate at offset 1000."""
    config = column_mean_mod.COLUMN_MEAN_CONFIGS[index]
    monkeypatch.setattr(column_mean_mod, "COLUMN_MEAN_CONFIGS", [config])
    x = rand_input((3, 150, 300), triton_device, offset=1000.0)
    launches = record_launches(lambda: column_mean_mod.column_mean(x, row_split=row_split))
    ((_, grid, _, meta),) = [rec for rec in launches if rec[0] == "_column_mean_kernel"]
    assert config.items() <= meta.items() and grid[1] == row_split
    assert len(launch_metas(launches, "_column_mean_finish_kernel")) == (row_split > 1)
    mean, corr = column_mean_mod.column_mean(x, row_split=row_split)
    xd = x.double()
    mean_ref = xd.mean(dim=1)
    torch.testing.assert_close(corr.double(), mean_ref - xd[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(mean.double(), mean_ref, atol=1.2e-4, rtol=0)  # ~2 ulp of 1000 in fp32
