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
