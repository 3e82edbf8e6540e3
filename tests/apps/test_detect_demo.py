"""``ckakd detect-demo`` (ckakd/apps/detect_demo.py): a tiny run writes its results, and the shipped synthetic
detection configs are the demo's settings."""

from __future__ import annotations

import inspect
import json
import math

from ckakd.apps.detect_demo import run_detect_demo
from ckakd.train.config import load_config


def test_detect_demo_tiny_writes_results(tmp_path):
    res = run_detect_demo(
        epochs=1,
        teacher_epochs=1,
        out=tmp_path,
        progress=False,
        num_train=4,
        num_val=4,
        batch_size=4,
        teacher_depth=18,
        teacher_width=8,
        student_width=8,
        num_convs=1,
    )
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["runs"]) == {"teacher", *(f"student_{m}" for m in ("baseline", "pcka", "pcka_mimic", "kd_patch"))}
    for run in data["runs"].values():
        assert set(run["metrics"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert run["train_time_s"] > 0
    assert res["runs"].keys() == data["runs"].keys() and (tmp_path / "results.md").is_file()
    assert (tmp_path / "detections.png").is_file()


def test_synthetic_configs_are_the_demo_settings():
    """`ckakd detect-train detection/retinanet_teacher` etc. reproduce `ckakd detect-demo`'s runs."""
    d = {k: v.default for k, v in inspect.signature(run_detect_demo).parameters.items()}
    teacher, student = load_config("detection/retinanet_teacher"), load_config("detection/retinanet_student")
    for cfg in (teacher, student):
        data = cfg.data
        assert (data.num_train, data.num_val, data.image_size, list(data.scales)) == (
            d["num_train"],
            d["num_val"],
            d["image_size"],
            list(d["scales"]),
        )
        assert (data.max_objects, data.occlusion, data.batch_size, data.flip) == (
            d["max_objects"],
            d["occlusion"],
            d["batch_size"],
            False,
        )
        assert cfg.optim.lr == d["lr"] and cfg.optim.weight_decay == 1e-4 and cfg.train.grad_clip == 10.0
        assert cfg.schedule.warmup_steps == min(100, d["num_train"] // d["batch_size"] // 3)
        kw = cfg.model.kwargs
        assert (kw["out_channels"], kw["num_convs"], list(kw["levels"])) == (
            d["out_channels"],
            d["num_convs"],
            list(d["levels"]),
        )
        assert (kw["octave_base_scale"], kw["head_norm"]) == (d["anchor_scale"], d["head_norm"])
    teacher_epochs = round(8 / 3 * d["epochs"])
    assert (teacher.model.kwargs["depth"], teacher.model.kwargs["width"]) == (d["teacher_depth"], d["teacher_width"])
    assert (student.model.kwargs["depth"], student.model.kwargs["width"]) == (d["student_depth"], d["student_width"])
    for cfg, epochs in ((teacher, teacher_epochs), (student, d["epochs"])):
        decay = math.ceil(0.8 * epochs)
        assert cfg.schedule.epochs == epochs and cfg.train.eval_every == epochs
        assert cfg.schedule.milestones == ([decay] if epochs >= 3 and decay < epochs else [])
    for name in ("pcka", "pcka_mimic", "kd_patch"):
        assert load_config(f"detection/{name}").teacher.kwargs == teacher.model.kwargs
