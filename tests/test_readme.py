"""The README's drop-in example runs as written."""

from __future__ import annotations

import pathlib
import re

import torch


def _blocks() -> list[str]:
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_wkd_example_runs():
    namespace: dict = {}
    exec(compile(_blocks()[1], "README.md", "exec"), namespace)
    assert namespace["logits_s"].grad is not None and torch.isfinite(namespace["loss"])


def test_readme_python_example_runs():
    blocks = _blocks()
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["student"][0].weight.grad is not None
    assert namespace["teacher"][0].weight.grad is None
    assert 0.0 <= namespace["pcka"].item() <= 10.0


def _block(marker: str) -> str:
    (block,) = [b for b in _blocks() if b.startswith(marker)]
    return block


def test_readme_python_training_api_example_runs(tmp_path, capsys):
    """The "Python training API" block as written (its run folder moved to tmp_path): a user's nn.Module pair on
    a user's DataLoaders with a distiller registered by decorator."""
    from ckakd.train.distillers.registry import DISTILLERS

    code = _block("# Python training API").replace('"runs/my_kd"', repr(str(tmp_path / "my_kd")))
    namespace: dict = {}
    try:
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        DISTILLERS.pop("my_kd", None)
    result = namespace["result"]
    assert result["epochs_completed"] == 3 and result["best_top1"] is not None
    header = (tmp_path / "my_kd" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/ce", "train/kd", "train/lcka", "val/top1"} <= set(header)
    assert (tmp_path / "my_kd" / "best.pt").is_file()
    assert namespace["teacher"][1].weight.grad is None  # the teacher stays frozen
    assert "best top-1" in capsys.readouterr().out


def test_readme_loss_modules_example_runs():
    """The "Losses as modules" block: per-sample KD values, DKD, and WKD-L compiled with fullgraph=True."""
    namespace: dict = {}
    exec(compile(_block("import torch, ckakd\n\nlogits_s, logits_t = torch.randn(16"), "README.md", "exec"), namespace)
    assert namespace["per_sample"].shape == (16,)
    assert namespace["logits_s"].grad is not None and torch.isfinite(namespace["logits_s"].grad).all()
