"""Benchmark of ``ckakd.patch_cka_loss(f_s, f_t, patch_size=(16, 16), reduce=...)`` (PCKA), every reduce mode.

f_s (B, C, H, W) requires grad, f_t does not. A case is a shape and a reduce mode ("channel": G = C problems
of (P, B·16·16), the choice of Zhou et al., IJCAI 2024; "batch": G = B problems of (P, C·16·16); "spatial":
G = 16·16 problems of (P, B·C)), named ``<shape>-<reduce>``. Providers:

* ``ckakd`` (backend "auto": the fused batched Triton kernel on CUDA, batched torch products on CPU) and
  ``ckakd-torch`` (CUDA only: ckakd's pure-torch path);
* ``torch-batched`` — the batched torch formulation: the maps permuted to (G, P, D) problem matrices, centered,
  two ``bmm`` Grams, CKA per problem — and ``torch-batched-compile``, its ``torch.compile``;
* ``loop`` — the per-problem loop: for "channel" the authors' formulation (a Python loop over channels, each
  cutting its (B, H, W) map into a (P, B·16·16) patch matrix with ``unfold``), for "batch" a loop over samples
  (``unfold`` of the (C, H, W) map), for "spatial" over the 16·16 in-patch positions (strided slices); each
  problem's centered linear CKA with plain torch ops. (``torch.compile`` of the loop is left out: dynamo
  unrolls all G iterations and compiles for minutes.)

Cost model for the floor, with N = B·C·H'·W' elements after the resize to multiples of 16 and
P = (H'/16)·(W'/16) patches (the same for every reduce mode: G·P·D = N): forward 4·P·N flops (a P×P Gram per
problem, student and teacher), reads f_s and f_t once; backward 2·P·N flops, reads f_s and writes grad_f_s;
full = forward + backward.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from harness import cli
from harness.providers import ckakd_providers, compiled, mode_cost
from harness.spec import Dims, OpBench, Provider, Target
from torch import Tensor

import ckakd
from ckakd import reference

PATCH = (16, 16)
REDUCES = ("channel", "batch", "spatial")
SHAPES: dict[str, Dims] = {  # feature maps (B, C, H, W)
    "b2-c256-64x64": (2, 256, 64, 64),
    "b2-c64-32x32": (2, 64, 32, 32),
    "fpn-b2-c256-100x168": (2, 256, 100, 168),  # an FPN level; resized to (96, 160)
}
# The bench's cases: every shape with every reduce mode, dims (B, C, H, W, reduce).
CASES: dict[str, Dims] = {f"{name}-{r}": (*dims, r) for name, dims in SHAPES.items() for r in REDUCES}


def _cases(*shapes: str) -> tuple[str, ...]:
    return tuple(f"{s}-{r}" for s in shapes for r in REDUCES)


PRESETS: dict[str, tuple[str, ...]] = {
    "cpu": _cases("b2-c256-64x64", "b2-c64-32x32"),
    "gpu": _cases("fpn-b2-c256-100x168") + ("b2-c256-64x64-channel",),
    "quick-cpu": _cases("b2-c64-32x32"),
    "quick-gpu": _cases("fpn-b2-c256-100x168"),
}
BATCHED = ("ckakd-torch", "torch-batched", "torch-batched-compile")  # the batched torch formulations
TARGETS = (
    Target.speedup("cpu", "b2-c256-64x64-channel", "full", 10.0, "loop"),
    # GPU (issue 12), FPN level, every reduce mode: ≥ 50× the per-problem loop, ≥ 5× the best batched torch
    *(
        t
        for case in _cases("fpn-b2-c256-100x168")
        for t in (
            Target.speedup("cuda", case, "full", 50.0, "loop"),
            Target.speedup("cuda", case, "full", 5.0, BATCHED),
        )
    ),
)


def resized_hw(h: int, w: int) -> tuple[int, int]:
    """Nearest multiple of the patch size (at least one patch), as ckakd resizes."""
    ph, pw = PATCH
    return max(ph, round(h / ph) * ph), max(pw, round(w / pw) * pw)


def make_inputs(dims: Dims, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, str]:
    """(f_s, f_t, reduce). Teacher = per-patch latent (constant over each 16×16 cell) + noise; the student shares
    half of it.

    Without the patch-level latent, random (P, D) patch matrices have Grams dominated by their diagonal and
    every CKA is ≈ 1, which would make the value check meaningless.
    """
    b, c, h, w, reduce = dims
    gen = torch.Generator(device=device).manual_seed(0)

    def patch_latent() -> Tensor:
        cells = torch.randn(b, c, -(-h // PATCH[0]), -(-w // PATCH[1]), generator=gen, device=device)
        return F.interpolate(cells, size=(h, w), mode="nearest")

    def noise() -> Tensor:
        return torch.randn((b, c, h, w), generator=gen, device=device)

    shared = patch_latent()
    f_t = shared + noise()
    f_s = 0.5 * shared + patch_latent() + noise()
    return f_s.to(dtype).requires_grad_(), f_t.to(dtype), reduce


def cost(dims: Dims, mode: str, esize: int) -> tuple[float, float]:
    b, c, h, w = dims[:4]
    th, tw = resized_hw(h, w)
    n = b * c * th * tw
    p = (th // PATCH[0]) * (tw // PATCH[1])
    size = b * c * h * w * esize
    fwd = (4 * p * n, 2 * size)
    bwd = (2 * p * n, 2 * size)
    return mode_cost(mode, fwd, bwd)


def _resized(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    """Both maps bilinearly resized to multiples of the patch size, as ckakd does."""
    size = resized_hw(*f_s.shape[-2:])
    if size != tuple(f_s.shape[-2:]):
        f_s = F.interpolate(f_s, size=size, mode="bilinear", align_corners=False)
        f_t = F.interpolate(f_t, size=size, mode="bilinear", align_corners=False)
    return f_s, f_t


def _patch_matrix(fmap: Tensor) -> Tensor:
    """(N, H, W) maps -> (P, N·ph·pw): the patches are the rows (samples), ``unfold`` per map."""
    cols = F.unfold(fmap.unsqueeze(1), kernel_size=PATCH, stride=PATCH)  # (N, ph·pw, P)
    return cols.permute(2, 0, 1).reshape(cols.shape[2], -1)


def _problem(f: Tensor, reduce: str, g: int) -> Tensor:
    """Problem ``g`` of (B, C, H', W') maps as a (P, D) matrix, cut the way a per-problem loop would."""
    if reduce == "channel":
        return _patch_matrix(f[:, g])  # channel g of every sample: (P, B·ph·pw)
    if reduce == "batch":
        return _patch_matrix(f[g])  # every channel of sample g: (P, C·ph·pw)
    i, j = divmod(g, PATCH[1])  # in-patch position (i, j) of every sample and channel: (P, B·C)
    cell = f[:, :, i :: PATCH[0], j :: PATCH[1]]
    return cell.flatten(2).permute(2, 0, 1).reshape(cell.shape[2] * cell.shape[3], -1)


def _linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Centered linear CKA of (P, D) matrices with plain torch ops."""
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    k, l = x @ x.T, y @ y.T
    return (k * l).sum() / ((k * k).sum().sqrt() * (l * l).sum().sqrt())


def loop_loss(f_s: Tensor, f_t: Tensor, reduce: str) -> Tensor:
    """The per-problem loop (per channel: the authors' formulation): mean over problems of 1 - CKA."""
    f_s, f_t = _resized(f_s, f_t)
    count = {"channel": f_s.shape[1], "batch": f_s.shape[0], "spatial": PATCH[0] * PATCH[1]}[reduce]
    losses = [1.0 - _linear_cka(_problem(f_s, reduce, g), _problem(f_t, reduce, g)) for g in range(count)]
    return torch.stack(losses).mean()


def _problems(f: Tensor, reduce: str) -> Tensor:
    """(B, C, H', W') -> (G, P, D) by one permute (+ the copy of its reshape)."""
    b, c, h, w = f.shape
    (ph, pw), gh, gw = PATCH, h // PATCH[0], w // PATCH[1]
    v = f.reshape(b, c, gh, ph, gw, pw)
    if reduce == "channel":
        return v.permute(1, 2, 4, 0, 3, 5).reshape(c, gh * gw, b * ph * pw)
    if reduce == "batch":
        return v.permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * ph * pw)
    return v.permute(3, 5, 2, 4, 0, 1).reshape(ph * pw, gh * gw, b * c)


def torch_batched_loss(f_s: Tensor, f_t: Tensor, reduce: str) -> Tensor:
    """The batched formulation: (G, P, D) problems, centered over P, two bmm Grams, per-problem CKA."""
    f_s, f_t = _resized(f_s, f_t)
    x, y = _problems(f_s, reduce), _problems(f_t, reduce)
    x = x - x.mean(dim=1, keepdim=True)
    y = y - y.mean(dim=1, keepdim=True)
    k, l = torch.bmm(x, x.transpose(1, 2)), torch.bmm(y, y.transpose(1, 2))
    cka = (k * l).sum((1, 2)) / ((k * k).sum((1, 2)).sqrt() * (l * l).sum((1, 2)).sqrt())
    return (1.0 - cka).mean()


def ckakd_loss(f_s: Tensor, f_t: Tensor, reduce: str, backend: str = "auto") -> Tensor:
    return ckakd.patch_cka_loss(f_s, f_t, patch_size=PATCH, reduce=reduce, backend=backend)


def providers(device: torch.device) -> list[Provider]:
    return ckakd_providers(device, ckakd_loss) + [
        Provider("torch-batched", torch_batched_loss),
        Provider("torch-batched-compile", compiled(torch_batched_loss)),
        Provider("loop", loop_loss),
    ]


def self_test() -> None:
    """The loop and batched baselines agree with ``ckakd.reference.patch_cka_loss`` (float64, with a resize),
    for every reduce mode."""
    gen = torch.Generator().manual_seed(0)
    f_t = torch.randn(2, 3, 40, 56, generator=gen, dtype=torch.float64)
    f_s = 0.5 * f_t + torch.randn(2, 3, 40, 56, generator=gen, dtype=torch.float64)
    for reduce in REDUCES:
        want = reference.patch_cka_loss(f_s, f_t, patch_size=PATCH, reduce=reduce)
        for fn in (loop_loss, torch_batched_loss):
            torch.testing.assert_close(fn(f_s, f_t, reduce), want, rtol=1e-10, atol=1e-12, msg=f"{fn.__name__}")


BENCH = OpBench(
    op="patch_alignment_stats",
    shapes=CASES,
    presets=PRESETS,
    make_inputs=make_inputs,
    cost=cost,
    providers=providers,
    baseline="loop",
    targets=TARGETS,
    self_test=self_test,
)

if __name__ == "__main__":
    sys.exit(cli.main([BENCH], description=__doc__.splitlines()[0]))
