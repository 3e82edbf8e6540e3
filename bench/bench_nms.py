"""The pure-PyTorch NMS fallback (``ckakd.detection.ops.nms_fallback``: the suppression mask formed once, read back
once, a host scan) against the greedy loop it replaced (one IoU row and one ``nonzero`` + host read per kept box).

    python bench/bench_nms.py [--device cpu|cuda] [--sizes 100,1000,3000] [--repeats 5]

Boxes like a detector's pre-NMS candidates (clustered around a few objects, so that most are suppressed, plus a
uniform background of which most are kept). Prints milliseconds per call (median) and kept boxes per size, and
checks that both give the same indices. Not part of ``run_all.py``: NMS has no loss or gradient to time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor

from ckakd.detection.boxes import box_iou
from ckakd.detection.ops import nms_fallback


def per_box_loop_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """The previous fallback: one IoU row and one host read (the next alive box) per kept box."""
    order = torch.sort(scores, descending=True, stable=True).indices
    sorted_boxes = boxes[order]
    alive = torch.ones(order.shape[0], dtype=torch.bool, device=boxes.device)
    keep: list[int] = []
    idx = 0
    while True:
        keep.append(idx)
        alive[idx] = False
        alive &= box_iou(sorted_boxes[idx : idx + 1], sorted_boxes)[0] <= iou_threshold
        nxt = torch.nonzero(alive)
        if nxt.numel() == 0:
            break
        idx = int(nxt[0, 0])
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def candidates(n: int, device: torch.device, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` boxes (half jittered around 20 objects, half uniform on a 800 x 800 image) and their scores."""
    g = torch.Generator().manual_seed(seed)
    objects = torch.rand(20, 2, generator=g) * 700
    centers = objects[torch.randint(0, 20, (n // 2,), generator=g)] + torch.randn(n // 2, 2, generator=g) * 6
    centers = torch.cat([centers, torch.rand(n - n // 2, 2, generator=g) * 800])
    wh = torch.rand(n, 2, generator=g) * 40 + 20
    boxes = torch.cat([centers - wh / 2, centers + wh / 2], dim=1)
    return boxes.to(device), torch.rand(n, generator=g).to(device)


def time_ms(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default="100,1000,3000")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'boxes':>6} {'kept':>5} {'per-box loop ms':>16} {'mask + scan ms':>15} {'speed-up':>9}")
    for n in (int(x) for x in args.sizes.split(",")):
        boxes, scores = candidates(n, device)
        old = per_box_loop_nms(boxes, scores, 0.5)
        new = nms_fallback(boxes, scores, 0.5)
        if not torch.equal(old, new):
            raise SystemExit(f"n={n}: the two fallbacks disagree")
        t_old = time_ms(lambda: per_box_loop_nms(boxes, scores, 0.5), args.repeats, device)  # noqa: B023
        t_new = time_ms(lambda: nms_fallback(boxes, scores, 0.5), args.repeats, device)  # noqa: B023
        print(f"{n:>6} {new.numel():>5} {t_old:>16.2f} {t_new:>15.2f} {t_old / t_new:>8.1f}x")


if __name__ == "__main__":
    main()
