"""DDP through torchrun (gloo, 2 CPU processes) and the single-process behaviour of ckakd.train.distributed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import ckakd
from ckakd.train import distributed as dist
from ckakd.train.engine import load_checkpoint
from ckakd.train.engine.metrics_log import TIMING_COLUMNS
from tests.train._engine_worker import wait_for_progress

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_ddp_worker.py")
WORLD = 2


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """Run tests/train/_ddp_worker.py once under torchrun with 2 gloo processes; returns its output folder."""
    base = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--standalone"]
    proc = subprocess.run(
        [*cmd, str(WORKER), str(base)], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return base


def test_ddp_training_syncs_ranks_and_only_rank0_writes(ddp_run):
    infos = [json.loads((ddp_run / f"info_rank{r}.json").read_text()) for r in range(WORLD)]
    for info in infos:
        assert info["world_size"] == WORLD and info["distributed"]
        assert info["train_sampler"] == "DistributedSampler" and info["val_sampler"] == "ShardSampler"
        assert info["train_batches"] == 4  # 64 images / 2 ranks / batch 8
        assert info["group_kept"]
    assert infos[0]["final_top1"] == infos[1]["final_top1"]  # metrics are all-reduced
    # the students started from different seeds; DDP synced them and they stayed identical (BatchNorm too)
    w0, w1 = (torch.load(ddp_run / f"weights_rank{r}.pt") for r in range(WORLD))
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    assert w0["2.running_mean"].abs().sum() > 0  # the BatchNorm statistics did move
    # only rank 0 wrote files
    assert not (ddp_run / "rank1").exists()
    written = sorted(p.name for p in (ddp_run / "rank0").iterdir())
    assert written == ["best.pt", "cka.png", "curves.png", "latest.pt", "metrics.csv", "metrics.jsonl"]
    rows = [json.loads(line) for line in (ddp_run / "rank0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(r["val/n"] == 45 for r in rows)  # every validation image counted exactly once over the ranks
    assert 0.0 <= rows[-1]["cka/3~3"] <= 1.0
    ckpt = load_checkpoint(ddp_run / "rank0" / "latest.pt")
    assert ckpt["world_size"] == WORLD and len(ckpt["rng"]) == WORLD and ckpt["epoch"] == 2
    for k in w0:
        assert torch.equal(ckpt["student"][k], w0[k]), k


def test_gather_batch_gives_global_batch_and_gradients(ddp_run):
    outs = [torch.load(ddp_run / f"gather_rank{r}.pt") for r in range(WORLD)]
    import importlib.util

    spec = importlib.util.spec_from_file_location("_ddp_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    x, y = worker.gather_inputs()
    x.requires_grad_(True)
    y.requires_grad_(True)
    full = ckakd.cka(x, y, backend="torch")
    full.backward()
    n = x.shape[0] // WORLD
    for r, out in enumerate(outs):
        assert out["world"] == WORLD
        assert torch.equal(out["gx"], x.detach())  # the gathered batch is the global batch, rank-major
        torch.testing.assert_close(out["cka"], full.detach(), rtol=1e-12, atol=1e-12)
        # every rank computes the same global loss, so its slice gets world_size x the single-process gradient
        # (DDP's averaging divides that back out)
        torch.testing.assert_close(out["grad_x"], WORLD * x.grad[r * n : (r + 1) * n], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out["grad_y"], WORLD * y.grad[r * n : (r + 1) * n], rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------ one process


def test_single_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not dist.init_from_env()
    assert (dist.rank(), dist.world_size(), dist.is_main_process(), dist.is_distributed()) == (0, 1, True, False)
    x = torch.randn(3, 2, requires_grad=True)
    assert dist.gather_batch(x) is x
    assert torch.equal(dist.all_reduce_sum(x), x.detach())
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    bn = nn.BatchNorm1d(2)
    bn.running_mean.fill_(3.0)
    dist.broadcast_buffers(bn)
    dist.barrier()
    dist.cleanup()
    assert torch.equal(bn.running_mean, torch.full((2,), 3.0))


def test_init_from_env_errors_without_torchrun_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match=r"\['RANK', 'MASTER_ADDR', 'MASTER_PORT'\] are not set.*torchrun"):
        dist.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
        dist.env_world_size()


def test_shard_sampler_partitions_without_padding():
    shards = [list(dist.ShardSampler(11, 3, r)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))
    assert [len(dist.ShardSampler(11, 3, r)) for r in range(3)] == [4, 4, 3]
    assert list(dist.ShardSampler(5)) == [0, 1, 2, 3, 4]  # single process: everything
    with pytest.raises(ValueError, match="out of range"):
        dist.ShardSampler(5, 2, 2)


def test_ddp_detection_training_and_gathered_coco_scoring(tmp_path):
    """Detection under torchrun: PCKA distillation through DetectionTask; weights stay in sync, every validation
    image is scored once, the DDP-gathered COCO metrics equal one process scoring the whole set, rank 0 writes."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--standalone"]
    worker = Path(__file__).with_name("_ddp_detection_worker.py")
    proc = subprocess.run(
        [*cmd, str(worker), str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    infos = [json.loads((tmp_path / f"info_rank{r}.json").read_text()) for r in range(WORLD)]
    for info in infos:
        assert info["world_size"] == WORLD and info["train_batches"] == 2  # 16 images / 2 ranks / batch 4
        assert info["train_sampler"] == "DistributedSampler" and info["val_sampler"] == "ShardSampler"
        assert info["final_val"]["n"] == 6  # each of the 6 validation images once over the ranks
    assert infos[0]["final_val"] == infos[1]["final_val"]
    single = infos[0]["single_process_val"]
    assert single["AP50"] > 0  # detections exist, so the comparison below means something
    for k, v in single.items():
        assert infos[0]["final_val"][k] == pytest.approx(v, abs=1e-9), k
    w0, w1 = (torch.load(tmp_path / f"weights_rank{r}.pt") for r in range(WORLD))
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    assert not (tmp_path / "rank1").exists()
    assert {"best.pt", "latest.pt", "metrics.csv", "cka.png"} <= {p.name for p in (tmp_path / "rank0").iterdir()}


# ------------------------------------------------------------------------------------------------ resume under DDP

ENGINE_WORKER = Path(__file__).with_name("_engine_worker.py")


def _torchrun_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    env.pop("CKAKD_WORKER_SLEEP", None)
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **extra)
    return env


def _torchrun(out: Path, *args: str, env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--standalone"]
    return subprocess.Popen(
        [*cmd, str(ENGINE_WORKER), str(out), "--epochs", "3", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the agent's own process group (the workers get sessions of their own)
    )


def _rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]


def _dead_within(pid: int, timeout: float) -> bool:
    """True once ``pid`` has exited (gone, or a zombie awaiting its parent) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if "zombie" in Path(f"/proc/{pid}/status").read_text():
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def test_ddp_sigkill_then_resume_is_bitwise_identical(tmp_path):
    """2 gloo processes killed with SIGKILL inside epoch 2, then resumed with --resume: the same weights and metrics
    as an uninterrupted 2-process run (deterministic mode); rank 0 alone writes, every rank reads latest.pt; a resume
    with another number of processes is refused before it trains."""
    import signal

    full, killed = tmp_path / "full", tmp_path / "killed"
    logs = {name: tmp_path / f"io_{name}" for name in ("full", "killed", "resumed")}
    for d in logs.values():
        d.mkdir()
    ref = _torchrun(full, env=_torchrun_env(CKAKD_WORKER_IO_LOG=str(logs["full"])))
    slow = _torchrun(killed, env=_torchrun_env(CKAKD_WORKER_SLEEP="0.15", CKAKD_WORKER_IO_LOG=str(logs["killed"])))
    position, pids = None, []
    try:
        position = wait_for_progress(killed, slow, 180)  # inside epoch 2 (0-based 1), two batches done
        assert slow.poll() is None, f"torchrun ended early:\n{slow.stdout.read().decode()[-3000:]}"
        pids = [int((logs["killed"] / f"pid_rank{r}.txt").read_text()) for r in range(WORLD)]
        for pid in pids:  # torchrun starts each worker in a session of its own
            os.kill(pid, signal.SIGKILL)
        os.killpg(slow.pid, signal.SIGKILL)
    finally:
        slow.wait(timeout=30)
    for pid in pids:  # SIGKILL is delivered asynchronously: on a loaded machine death can take a moment
        assert _dead_within(pid, 30.0), f"worker {pid} still running 30 s after SIGKILL"
    assert slow.returncode == -signal.SIGKILL and position is not None and position[0] == 1, position
    ckpt_path = killed / "latest.pt"
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt["epoch"] == 1 and ckpt["world_size"] == WORLD and len(ckpt["rng"]) == WORLD
    assert not (killed / "final.pt").exists()

    # one process cannot continue a 2-process run: refused before any training, the checkpoint untouched
    import importlib.util

    spec = importlib.util.spec_from_file_location("_engine_worker", ENGINE_WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    before, deterministic = ckpt_path.read_bytes(), torch.are_deterministic_algorithms_enabled()
    try:
        trainer, _ = worker.build_trainer(killed, 3, True)
        with pytest.raises(ValueError, match=r"written by 2 process\(es\), this run has 1 .*--nproc_per_node 2"):
            trainer.fit()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert ckpt_path.read_bytes() == before

    resumed = _torchrun(killed, "--resume", env=_torchrun_env(CKAKD_WORKER_IO_LOG=str(logs["resumed"])))
    out, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, out.decode()[-3000:]
    out, _ = ref.communicate(timeout=240)
    assert ref.returncode == 0, out.decode()[-3000:]

    a, b = torch.load(full / "final.pt"), torch.load(killed / "final.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _rows(killed / "metrics.jsonl") == _rows(full / "metrics.jsonl")
    assert [r["epoch"] for r in _rows(killed / "metrics.jsonl")] == [1, 2, 3]

    io = {(name, r): (d / f"io_rank{r}.txt") for name, d in logs.items() for r in range(WORLD)}
    text = {key: p.read_text().split("\n") if p.exists() else [] for key, p in io.items()}
    for name in logs:
        assert "write latest.pt" in text[(name, 0)], name  # rank 0 writes ...
        assert not [line for line in text[(name, 1)] if line.startswith("write")], name  # ... and only rank 0
    for r in range(WORLD):
        assert "read latest.pt" in text[("resumed", r)], r  # every rank reads the checkpoint
