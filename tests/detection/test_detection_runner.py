"""Detection on the shared config / trainer machinery: shipped configs, the detect-* commands end to end,
resume, AMP, and bad configs failing before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ckakd.apps import cli
from ckakd.detection import runner
from ckakd.detection.config import DetectionConfig
from ckakd.detection.trainer import DetectionDistiller
from ckakd.interrelation import save_interrelation
from ckakd.train.config import Config, list_configs, load_config
from ckakd.train.engine import load_checkpoint

DETECTION_CONFIGS = [n for n in list_configs() if n.startswith("detection/")]
METRICS = {"AP", "AP50", "AP75", "APs", "APm", "APl"}


def tiny(out: Path, epochs: int = 1) -> list[str]:
    return [
        "data.num_train=8",
        "data.num_val=4",
        "data.batch_size=4",
        "data.eval_batch_size=4",
        f"schedule.epochs={epochs}",
        "schedule.milestones=[]",
        "schedule.warmup_steps=2",
        "train.eval_every=1",
        "run.progress=false",
        f"run.out_dir={out}",
        "model.kwargs.width=8",
    ]


def tiny_teacher(ckpt: Path) -> list[str]:
    return ["teacher.kwargs.depth=18", "teacher.kwargs.width=8", f"teacher.checkpoint={ckpt}"]


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A tiny RetinaNet teacher trained for one epoch through the CLI (R18, width 8)."""
    out = tmp_path_factory.mktemp("det_teacher")
    args = [*tiny(out), "model.kwargs.depth=18"]
    assert cli.main(["detect-train", "detection/retinanet_teacher", *args]) == 0
    return out / "retinanet_teacher" / "latest.pt"


def test_detection_configs_are_shipped_and_typed():
    assert {"detection/base", "detection/retinanet_teacher", "detection/retinanet_student", "detection/pcka"} <= set(
        DETECTION_CONFIGS
    )
    methods = {load_config(n).distiller.name for n in DETECTION_CONFIGS}
    assert {
        "none",
        "pcka",
        "pcka_mimic",
        "kd_patch",
        "at_patch",
        "dist_patch",
        "mmd_patch",
        "wkd_f",
        "wkd_l",
    } <= methods
    assert isinstance(load_config("digits/rcka"), Config)


@pytest.mark.parametrize("name", DETECTION_CONFIGS)
def test_shipped_detection_config_builds(name, tmp_path, one_thread):
    """Every shipped detection config resolves and builds its data, detectors and distiller (random weights)."""
    cfg = load_config(name, tiny(tmp_path))
    assert isinstance(cfg, DetectionConfig) and cfg.task == "detection"
    if cfg.data.name == "coco":  # no COCO folders here: the models and the distiller, for COCO's 80 classes
        if "torchvision." in f"{cfg.model.name} {cfg.teacher.name}":
            pytest.importorskip("torchvision", reason="torchvision configs need torchvision")
        student = runner.build_detector(cfg.model.name, cfg.model.kwargs, 80, section="model")
        assert student.num_classes == 80
        if cfg.teacher.name is not None:
            teacher = runner.build_detector(cfg.teacher.name, cfg.teacher.kwargs, 80, section="teacher")
            distiller = runner.build_detection_distiller(cfg, student, teacher, 80)
            assert distiller.method == cfg.distiller.name and len(distiller.feature_paths_s) >= 1
        return
    data = runner.build_detection_data(cfg)
    student = runner.build_detector(cfg.model.name, cfg.model.kwargs, data.num_classes, section="model")
    assert student.num_classes == data.num_classes == 10
    if cfg.distiller.name == "none":  # detect-train configs (and the _distill base)
        return
    assert cfg.teacher.checkpoint, name
    teacher = runner.build_detector(cfg.teacher.name, cfg.teacher.kwargs, data.num_classes, section="teacher")
    if cfg.distiller.cost:
        cost = tmp_path / "ir.pt"
        save_interrelation(cost, torch.eye(10), kernel="cka")
        cfg.distiller.cost = str(cost)
    distiller = runner.build_detection_distiller(cfg, student, teacher, data.num_classes)
    assert isinstance(distiller, DetectionDistiller) and distiller.method == cfg.distiller.name
    images, targets, sizes = next(iter(runner.detection_loaders(cfg, data)[0]))
    losses = distiller.forward_train(images, targets, sizes)
    assert "distill" in losses and all(torch.isfinite(v) for v in losses.values())


def test_detect_commands_end_to_end(teacher_ckpt, tmp_path, capsys, one_thread):
    out = teacher_ckpt.parent
    assert {"config.yaml", "metrics.csv", "metrics.jsonl", "latest.pt", "best.pt", "curves.png"} <= {
        p.name for p in out.iterdir()
    }
    saved = load_config(out / "config.yaml")
    assert isinstance(saved, DetectionConfig) and saved.model.kwargs["width"] == 8
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "train/cls", "train/box", "val/AP", "val/AP50", "epoch_time_s"} <= set(header)
    ckpt = load_checkpoint(teacher_ckpt)
    assert ckpt["metric"] == "AP" and ckpt["epoch"] == 1

    base = [*tiny(tmp_path), "model.kwargs.depth=18"]
    capsys.readouterr()
    png = tmp_path / "dets.png"
    argv = ["detect-eval", "detection/retinanet_teacher", *base, "--checkpoint", str(teacher_ckpt), "--plot", str(png)]
    assert cli.main(argv) == 0 and png.is_file()
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == METRICS | {"n"} and metrics["n"] == 4
    assert all(0.0 <= metrics[k] <= 100.0 for k in METRICS)

    # WKD-L: interrelation of the teacher, then distillation with it, with the CKA log on P3
    t = tiny_teacher(teacher_ckpt)
    args = ["detect-interrelation", "detection/wkd_l", *tiny(tmp_path), *t, "data.num_train=40"]
    assert cli.main([*args, "--samples-per-class", "2", "--out", str(tmp_path / "ir.pt")]) == 0
    pairs = "train.cka_pairs=[[backbone.fpn_levels.0,backbone.fpn_levels.0]]"
    t.append("distiller.kwargs.score_thresh=0.0")  # a 1-epoch teacher is confident nowhere: take its top-k
    code = cli.main(
        ["detect-distill", "detection/wkd_l", *tiny(tmp_path), *t, f"distiller.cost={tmp_path / 'ir.pt'}", pairs]
    )
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "retinanet_wkd_l" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["train/distill"] > 0
    assert 0.0 <= rows[0]["cka/backbone.fpn_levels.0~backbone.fpn_levels.0"] <= 1.0 + 1e-6
    assert (tmp_path / "retinanet_wkd_l" / "cka.png").is_file()


def test_detect_distill_resumes(teacher_ckpt, tmp_path, one_thread):
    args = ["detect-distill", "detection/pcka_mimic", *tiny_teacher(teacher_ckpt)]
    assert cli.main([*args, *tiny(tmp_path, epochs=1)]) == 0
    run = tmp_path / "retinanet_pcka_mimic"
    first = load_checkpoint(run / "latest.pt")
    assert cli.main([*args, *tiny(tmp_path, epochs=2), "--resume"]) == 0
    second = load_checkpoint(run / "latest.pt")
    assert second["epoch"] == 2 and second["global_step"] == 2 * first["global_step"]
    assert [r["epoch"] for r in second["history"]] == [1, 2]
    assert second["history"][0] == first["history"][0]  # the resumed run kept epoch 1's row
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert set(second["extra"]) and any(k.startswith("backbone.") for k in second["student"])


def test_fcos_amp_trains_finite(tmp_path, one_thread):
    """bf16 autocast on the CPU: the losses stay finite (they are computed in float32)."""
    cfg = load_config("detection/fcos_student", [*tiny(tmp_path, epochs=2), "run.amp=true"])
    result = runner.train_detection(cfg)
    assert result["epochs_run"] == 2 and set(result["final_val"]) >= METRICS


def _rc(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(argv)
    return code, capsys.readouterr().err


def test_bad_detection_configs_fail_before_writing(teacher_ckpt, tmp_path, capsys):
    out = tmp_path / "bad"
    base = tiny(out)
    t = tiny_teacher(teacher_ckpt)
    for argv, needle in (
        (["detect-train", "digits/teacher"], "classification config"),
        (["train-teacher", "detection/retinanet_student"], "detection config"),
        (["distill", "detection/pcka"], "detection config"),
    ):
        code, err = _rc([*argv, f"run.out_dir={out}"], capsys)
        assert code == 2 and needle in err, (argv, err)
    cases = [
        (["detect-train", "detection/retinanet_student", "model.name=yolo"], "model.name='yolo'"),
        (["detect-train", "detection/retinanet_student", "model.kwargs.depth=19"], "model.kwargs"),
        (["detect-train", "detection/retinanet_student", "model.kwargs.colour=1"], "model.kwargs"),
        (["detect-train", "detection/retinanet_student", "data.scales=[16,80]"], "data.scales"),
        (["detect-train", "detection/retinanet_student", "data.name=coco"], "data.train_images"),
        (
            ["detect-train", "detection/retinanet_student", "data.name=coco", f"data.train_images={tmp_path}/nope"],
            "folder not found",
        ),
        (["detect-distill", "detection/pcka", "teacher.checkpoint=/nope/latest.pt"], "teacher.checkpoint"),
        (["detect-distill", "detection/pcka", *t, "teacher.kwargs.width=16"], "teacher.checkpoint"),
        (["detect-distill", "detection/pcka", *t, "distiller.kwargs.colour=1"], "distiller.kwargs"),
        (["detect-distill", "detection/pcka", *t, "distiller.name=fitnet"], "distiller.name='fitnet'"),
        (["detect-distill", "detection/wkd_l", *t, "distiller.cost=null"], "distiller.cost"),
        (["detect-distill", "detection/pcka", *t, "model.kwargs.levels=[3,4,5,6]"], "same number of FPN levels"),
        (
            ["detect-distill", "detection/pcka", *t, "train.cka_pairs=[[backbone.nope,backbone.fpn_levels.0]]"],
            "cka_pairs",
        ),
        (["detect-train", "detection/retinanet_student", "task=segmentation"], "task"),
    ]
    for argv, needle in cases:
        code, err = _rc([*argv, *base], capsys)
        assert code == 2, (argv, err)
        assert needle in err, (argv, err)
    assert not out.exists()  # nothing was written by any of them


def test_coco_config_runs(tmp_path, one_thread):
    """A COCO-format dataset through the config (the synthetic set written as PNG + JSON), flip on."""
    from PIL import Image

    from ckakd.detection.data import SyntheticDigitsDetection

    for split, n in (("train", 8), ("val", 4)):
        ds = SyntheticDigitsDetection(n, image_size=64, max_objects=3, scales=(16, 32), split=split)
        folder = tmp_path / split
        folder.mkdir()
        coco = ds.to_coco()
        for img in coco["images"]:
            arr = (ds[img["id"]][0].permute(1, 2, 0).numpy() * 255).clip(0, 255).astype("uint8")
            Image.fromarray(arr).save(folder / img["file_name"])
        (tmp_path / f"{split}.json").write_text(json.dumps(coco))
    overrides = [
        *tiny(tmp_path / "runs"),
        "data.name=coco",
        f"data.train_images={tmp_path / 'train'}",
        f"data.train_annotations={tmp_path / 'train.json'}",
        f"data.val_images={tmp_path / 'val'}",
        f"data.val_annotations={tmp_path / 'val.json'}",
        "data.min_size=64",
        "data.max_size=64",
        "data.flip=true",
    ]
    result = runner.train_detection(load_config("detection/retinanet_student", overrides))
    assert result["final_val"]["n"] == 4 and set(result["final_val"]) >= METRICS


def test_bf16_cpu_autocast_gives_sane_gradients_on_one_pixel_levels(one_thread):
    """P6 -> P7 of a 64-px image is a stride-2 conv on a 1x1 map, where torch's bf16 CPU convolution returns
    garbage weight gradients; the FPN runs those levels in float32 under CPU autocast."""
    from ckakd.detection.models import RetinaNet

    torch.manual_seed(0)
    model = RetinaNet(10, depth=18, width=8, out_channels=16, num_convs=1).train()
    images = torch.rand(2, 3, 64, 64)
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    grads = []
    for amp in (False, True, True, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            losses = model(images, targets)
        sum(losses.values()).backward()
        grads.append(model.backbone.extra_convs[1].weight.grad.clone())
    for g in grads[1:]:
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, grads[0], atol=0.05 * float(grads[0].abs().max()) + 1e-6, rtol=0.05)
