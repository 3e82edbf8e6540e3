"""The detection config schema (ckakd.detection.config): registered with the config loader, suggestions from the
detection schema, the detection recipe's section defaults."""

from __future__ import annotations

import pytest

from ckakd.detection.config import (
    DetectionConfig,
    DetectionOptimConfig,
    DetectionScheduleConfig,
    DetectionTrainConfig,
)
from ckakd.detection.trainer import detection_settings
from ckakd.train.config import config_from_dict, load_config
from ckakd.train.config_files import registered_tasks


def test_detection_task_is_registered():
    assert registered_tasks()["detection"].schema is DetectionConfig
    assert isinstance(config_from_dict({"task": "detection"}), DetectionConfig)


def test_unknown_detection_key_suggests_from_the_detection_schema():
    with pytest.raises(ValueError, match=r"'train\.min_size' \(did you mean 'data\.min_size'\?\)"):
        load_config("detection/retinanet_student", ["train.min_size=3"])


def test_detection_checks():
    with pytest.raises(ValueError, match="teacher.augment: detection teachers see the student's images"):
        config_from_dict({"task": "detection", "teacher": {"name": "retinanet", "augment": "weak"}})
    with pytest.raises(ValueError, match=r"data\.scales: expected \[min, max\]"):
        config_from_dict({"task": "detection", "data": {"scales": [30, 10]}})
    with pytest.raises(ValueError, match=r"schedule\.milestones: expected strictly increasing"):
        config_from_dict({"task": "detection", "schedule": {"milestones": [9, 3]}})


def test_detection_settings_are_the_detection_sections_defaults(tmp_path):
    """detection_settings fills what it is not given from the detection sections (no second set of defaults)."""
    s = detection_settings(epochs=10, lr=0.02, out_dir=tmp_path)
    assert type(s.optim) is DetectionOptimConfig and type(s.schedule) is DetectionScheduleConfig
    assert type(s.train) is DetectionTrainConfig
    assert (s.optim.lr, s.optim.momentum, s.optim.weight_decay) == (0.02, 0.9, 1e-4)
    assert (s.schedule.epochs, s.schedule.milestones, s.schedule.warmup_steps) == (10, [8], 100)
    assert (s.train.grad_clip, s.run.device) == (10.0, "cpu")
    assert detection_settings(epochs=2, lr=0.01, out_dir=tmp_path, warmup_iters=3).schedule.milestones == []
    assert detection_settings(epochs=2, lr=0.01, out_dir=tmp_path, warmup_iters=3).schedule.warmup_steps == 3
