"""Building blocks of the bench modules: the ckakd / reference providers, ``torch.compile`` of a baseline,
correlated test features, and the forward / backward / full split of a cost model."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from harness.spec import LossFn, Provider


def compiled(fn: LossFn) -> LossFn:
    """``torch.compile`` of ``fn`` (static shapes; compile time is excluded by the warm-up call).

    AOTAutograd "donates" saved buffers to the compiled backward, which then refuses
    ``retain_graph=True`` — needed by the backward mode — so donation is switched off.
    """
    with contextlib.suppress(Exception):
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
    return torch.compile(fn, dynamic=False)


def ckakd_providers(device: torch.device, loss: LossFn, torch_on_cpu: bool = False) -> list[Provider]:
    """``ckakd``: ``loss(*inputs)`` (backend "auto"), and ``ckakd-torch``: ``loss(*inputs, backend="torch")``, the
    pure-torch path — on CUDA only (where "auto" means Triton), or also on the CPU with ``torch_on_cpu`` (where
    "auto" is a compiled extension, as for Sinkhorn)."""
    out = [Provider("ckakd", loss)]
    if device.type == "cuda" or torch_on_cpu:
        out.append(Provider("ckakd-torch", functools.partial(loss, backend="torch")))
    return out


def reference_providers(device: torch.device, ckakd_loss: LossFn, reference_fn: LossFn) -> list[Provider]:
    """:func:`ckakd_providers`, then the reference and its ``torch.compile`` (``reference-compile``)."""
    compiled_reference = Provider("reference-compile", compiled(reference_fn))
    return ckakd_providers(device, ckakd_loss) + [Provider("reference", reference_fn), compiled_reference]


def mode_cost(mode: str, forward: tuple[float, float], backward: tuple[float, float]) -> tuple[float, float]:
    """(flops, bytes) of one timed call in ``mode`` from the forward's and the backward's; ``full`` = their sum."""
    if mode == "forward":
        return forward
    if mode == "backward":
        return backward
    return forward[0] + backward[0], forward[1] + backward[1]


def latent_features(
    n: int,
    dims: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
    shared: float = 1.0,
    rank: int = 16,
    seed: int = 0,
) -> list[Tensor]:
    """Features (n, d_i) = z·W_i + own latent + noise with a shared rank-``rank`` latent z.

    Gives Grams that are not dominated by their diagonal, so CKA sits well inside (0, 1) and the
    check compares meaningful values.
    """
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

    z = randn(n, rank)
    out = []
    for d in dims:
        own = randn(n, rank)
        x = (shared * z + own) @ randn(rank, d) / rank**0.5 + randn(n, d)
        out.append(x.to(dtype))
    return out
