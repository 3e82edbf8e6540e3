"""The main job on embedded data: CKA distillation on scikit-learn's digits (1,797 real 8×8 images).

Trains a teacher CNN, then two students with the same seeds — cross-entropy only, and CE + RCKA
(``ckakd.rcka_loss``: feature CKA + intra/inter-class logit CKA) — and reports student accuracy,
teacher–student CKA of the last feature maps and of the logits, and the time spent in the ckakd
losses. Takes about a minute on 2 CPU cores.

    python -m ckakd.demo [--epochs 20] [--seeds 5] [--out ckakd_outputs/demo]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ckakd


def load_digits_tensors(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits as (N, 1, 8, 8) float images in [0, 1] and labels, split 75/25 with a fixed permutation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - the demo extra installs it
        raise SystemExit("the demo needs scikit-learn: pip install scikit-learn") from exc
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    images, labels = images[perm], labels[perm]
    split = int(0.75 * len(labels))
    return images[:split], labels[:split], images[split:], labels[split:]


class SmallCNN(nn.Module):
    """conv-bn-relu ×2 (+ pool) → feature map (B, width, 4, 4) → linear classifier."""

    def __init__(self, width: int, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(width * 16, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feat = self.body(x)
        return feat, self.head(feat.flatten(1))


@dataclass
class RunResult:
    method: str
    seed: int
    accuracy: float
    feature_cka: float
    logit_cka: float
    train_seconds: float
    loss_seconds: float


def _batches(n: int, batch_size: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    for start in range(0, n - batch_size + 1, batch_size):  # drop the last partial batch (CKA needs n >= 2)
        yield perm[start : start + batch_size]


def train(
    model: nn.Module,
    data,
    *,
    epochs: int,
    seed: int,
    teacher: nn.Module | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    batch_size: int = 64,
) -> tuple[float, float]:
    """SGD training; with a teacher, adds ckakd.rcka_loss. Returns (train seconds, seconds in the CKA loss)."""
    x_train, y_train = data[0], data[1]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    loss_time, start = 0.0, time.perf_counter()
    for _ in range(epochs):
        model.train()
        for idx in _batches(len(y_train), batch_size, gen):
            xb, yb = x_train[idx], y_train[idx]
            feat, logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            if teacher is not None:
                with torch.no_grad():
                    feat_t, logits_t = teacher(xb)
                t0 = time.perf_counter()
                loss = loss + ckakd.rcka_loss(feat, feat_t, logits, logits_t, alpha=alpha, beta=beta)
                loss_time += time.perf_counter() - t0
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return time.perf_counter() - start, loss_time


@torch.no_grad()
def evaluate(model: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    model.eval()
    teacher.eval()
    feat, logits = model(x)
    feat_t, logits_t = teacher(x)
    return {
        "accuracy": (logits.argmax(1) == y).float().mean().item(),
        "feature_cka": ckakd.cka(feat.flatten(1), feat_t.flatten(1)).item(),
        "logit_cka": ckakd.cka(logits, logits_t).item(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--teacher-width", type=int, default=24)
    parser.add_argument("--student-width", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=1.0, help="RCKA feature-CKA weight")
    parser.add_argument("--beta", type=float, default=1.0, help="RCKA logit-CKA weight")
    parser.add_argument("--out", default="ckakd_outputs/demo")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))

    print("ckakd", ckakd.__version__, "— backends:")
    for status in ckakd.backends().values():
        print("  ", status)
    data = load_digits_tensors()
    print(f"digits: {len(data[1])} train / {len(data[3])} test images of 8×8, 10 classes")

    torch.manual_seed(0)
    teacher = SmallCNN(args.teacher_width)
    t_secs, _ = train(teacher, data, epochs=args.epochs, seed=0)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        t_acc = (teacher(data[2])[1].argmax(1) == data[3]).float().mean().item()
    print(f"teacher (width {args.teacher_width}): test accuracy {t_acc:.4f}, trained in {t_secs:.1f}s")

    results: list[RunResult] = []
    for seed in range(args.seeds):
        for method in ("ce", "rcka"):
            torch.manual_seed(seed)
            student = SmallCNN(args.student_width)
            secs, loss_secs = train(
                student,
                data,
                epochs=args.epochs,
                seed=seed,
                teacher=teacher if method == "rcka" else None,
                alpha=args.alpha,
                beta=args.beta,
            )
            metrics = evaluate(student, teacher, data[2], data[3])
            results.append(RunResult(method, seed, train_seconds=secs, loss_seconds=loss_secs, **metrics))

    print(f"\nstudent (width {args.student_width}), {args.epochs} epochs, {args.seeds} seeds; test set:")
    print("| method | top-1 (mean ± std) | feature CKA to teacher | logit CKA | train s | CKA-loss s |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for method in ("ce", "rcka"):
        rows = [r for r in results if r.method == method]
        acc = torch.tensor([r.accuracy for r in rows])

        def mean(attr: str, rows=rows) -> float:
            return sum(getattr(r, attr) for r in rows) / len(rows)

        std = acc.std().item() if len(rows) > 1 else 0.0
        summary[method] = {
            "top1_mean": acc.mean().item(),
            "top1_std": std,
            **{k: mean(k) for k in ("feature_cka", "logit_cka", "train_seconds", "loss_seconds")},
        }
        s = summary[method]
        print(
            f"| {method} | {s['top1_mean']:.4f} ± {s['top1_std']:.4f} | {s['feature_cka']:.3f} | "
            f"{s['logit_cka']:.3f} | {s['train_seconds']:.1f} | {s['loss_seconds']:.2f} |"
        )
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(
            {
                "args": vars(args),
                "teacher_accuracy": t_acc,
                "summary": summary,
                "runs": [r.__dict__ for r in results],
            },
            fh,
            indent=2,
        )
    print(f"\nresults written to {os.path.abspath(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
