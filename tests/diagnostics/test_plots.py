"""ckakd.diagnostics.plots: the CKA heatmap figure."""

from __future__ import annotations

import pytest

from ckakd import diagnostics as D
from tests.diagnostics.helpers import (
    data,
    loader,
    zoo,
)


def test_plot_cka_heatmap(tmp_path):
    s, t = zoo(0), zoo(1)
    ds = data(40)
    m = D.layer_cka_heatmap(s, t, loader(ds, 16), ["layer1", "layer3"], ["layer2"], max_samples=30)
    path = D.plot_cka_heatmap(m, ["layer1", "layer3"], ["layer2"], tmp_path / "sub" / "cka.png")
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="does not match"):
        D.plot_cka_heatmap(m, ["a"], ["b"], tmp_path / "bad.png")
