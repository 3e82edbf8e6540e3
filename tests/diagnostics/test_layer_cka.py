"""ckakd.diagnostics.layer_cka: the student x teacher layer CKA heatmap."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

import ckakd
from ckakd import diagnostics as D
from ckakd.train import FeatureHooks
from tests.diagnostics.helpers import (
    TinyCNN,
    data,
    loader,
    zoo,
)


def test_layer_cka_heatmap():
    s, t = zoo(0), zoo(1)
    ds = data(40)
    h = D.layer_cka_heatmap(s, s, loader(ds, 16), s.stage_names, s.stage_names)
    assert h.shape == (3, 3) and h.dtype == torch.float64
    torch.testing.assert_close(h.diagonal(), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(h, h.T, rtol=0, atol=1e-10)

    m = D.layer_cka_heatmap(s, t, loader(ds, 16), ["layer1", "layer3"], ["layer2"], max_samples=30)
    assert m.shape == (2, 1)
    x = ds.tensors[0][:30]
    with FeatureHooks(s, ["layer3"], detach=True) as hs, FeatureHooks(t, ["layer2"], detach=True) as ht:
        with torch.no_grad():
            s(x)
            t(x)
        expected = ckakd.cka(hs["layer3"].flatten(1).double(), ht["layer2"].flatten(1).double())
    assert m[1, 0].item() == pytest.approx(expected.item(), rel=1e-10)
    assert 0.0 < m[1, 0].item() < 1.0
    with pytest.raises(ValueError, match="layer9"):
        D.layer_cka_heatmap(s, t, loader(ds, 16), ["layer9"], ["layer2"])


def test_layer_cka_heatmap_bad_inputs():
    five = TinyCNN(num_classes=5)
    empty = loader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), 4)
    with pytest.raises(ValueError, match="no samples"):
        D.layer_cka_heatmap(five, five, empty, ["features"], ["features"])
