"""Attention maps and their overlap (Guo et al., "Why does Knowledge Distillation Work? Rethink its Attention
and Fidelity Mechanism"): class-summed CAM or Grad-CAM at the last convolutional block, upsampled, min-max
normalized and thresholded at 0.4; IoU pooled over the set (Σ∩ / Σ∪) over all k masks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import combinations
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ckakd._checks import module_names
from ckakd.diagnostics._common import (
    CAM_METHODS,
    LayerArg,
    ModelsArg,
    check_logits,
    device_for,
    eval_mode,
    get_layer,
    iter_batches,
    named_models,
)

__all__ = [
    "default_cam_layer",
    "cam",
    "grad_cam",
    "attention_masks",
    "attention_iou",
    "IoUAccumulator",
    "attention_iou_over_loader",
]


def default_cam_layer(model: nn.Module) -> str:
    """Layer used when ``layer=None``: ``model.stage_names[-1]`` when the model has ``stage_names`` (zoo models:
    the last stage, whose map is pooled into ``model.classifier``), otherwise the last ``nn.Conv2d`` in
    ``model.named_modules()`` order. ``ValueError`` if there is no ``nn.Conv2d`` at all."""
    stages = getattr(model, "stage_names", None)
    if stages:
        path = str(list(stages)[-1])
        get_layer(model, path)
        return path
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n]
    if not convs:
        raise ValueError(
            f"{type(model).__name__} has no nn.Conv2d layer: CAM / Grad-CAM need a convolutional feature map "
            f"(B, C, H, W); pass layer= naming a module that outputs one (modules: {module_names(model)})"
        )
    return convs[-1]


def _linear_head(model: nn.Module, channels: int, layer: str) -> nn.Linear:
    head = getattr(model, "classifier", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"CAM needs a linear classifier `model.classifier` (nn.Linear after global average pooling); "
            f"{type(model).__name__} has {type(head).__name__ if head is not None else 'none'}. Use grad_cam instead."
        )
    if head.in_features != channels:
        raise ValueError(
            f"CAM: {type(model).__name__}.classifier takes {head.in_features} features but layer {layer!r} has "
            f"{channels} channels; choose the layer whose map is pooled into the classifier, or use grad_cam"
        )
    return head


def _targets(target: int | Tensor | None, logits: Tensor) -> Tensor:
    b, k = logits.shape
    if target is None:
        t = logits.argmax(1)
    elif isinstance(target, int):
        t = torch.full((b,), int(target), dtype=torch.long, device=logits.device)
    else:
        t = torch.as_tensor(target, device=logits.device).long().reshape(-1)
        if t.numel() == 1:
            t = t.expand(b)
        if t.shape[0] != b:
            raise ValueError(f"target must be an int or (B,) = ({b},) class indices, got shape {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= k):
        raise ValueError(f"target class indices must lie in [0, {k}), got {t.tolist()}")
    return t


def _postprocess(maps: Tensor, size: tuple[int, int], upsample: bool, normalize: bool) -> Tensor:
    """(B, h, w) -> bilinear to ``size`` (optional) -> per-image min-max to [0, 1] (optional; constant -> 0)."""
    if upsample and tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    if normalize:
        flat = maps.flatten(1)
        lo, hi = flat.min(1).values, flat.max(1).values
        span = hi - lo
        ok = span > 0
        scale = torch.where(ok, span, torch.ones_like(span))
        flat = torch.where(ok.unsqueeze(1), (flat - lo.unsqueeze(1)) / scale.unsqueeze(1), torch.zeros_like(flat))
        maps = flat.reshape(maps.shape)
    return maps


def attention_forward(
    model: nn.Module,
    x: Tensor,
    layer: str | None,
    method: str,
    *,
    class_sum: bool = True,
    target: int | Tensor | None = None,
    upsample: bool = True,
    normalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """One forward of ``model`` (mode left as is): ``(logits (B, K) detached, maps (B, H, W))``.

    The feature map is captured by a forward hook on ``layer`` (its last call, if it runs more than once) as a
    private copy, so in-place ops after the layer cannot alter it. For Grad-CAM the copy is a fresh leaf whose
    clone flows downstream, and grad mode is switched on from the layer onwards only: no graph is built for the
    layers before it and no parameter's ``.grad`` is touched.
    """
    if method not in CAM_METHODS:
        raise ValueError(f"method must be one of {CAM_METHODS}, got {method!r}")
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be an image batch (B, C, H, W), got {tuple(x.shape) if isinstance(x, Tensor) else x}")
    path = default_cam_layer(model) if layer is None else layer
    module = get_layer(model, path)
    store: dict[str, Tensor] = {}
    grad_mode = torch.is_grad_enabled()

    def hook(mod: nn.Module, args: Any, output: Any) -> Tensor | None:
        if not isinstance(output, Tensor) or output.dim() != 4:
            got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(
                f"layer {path!r} of {type(model).__name__} must output a (B, C, H, W) feature map for CAM / "
                f"Grad-CAM, got {got}"
            )
        feat = output.detach().clone()
        store["f"] = feat
        if method == "cam":
            return None  # the model's own output flows on; `feat` is a private copy
        torch.set_grad_enabled(True)  # from here on only: no graph for the layers before
        feat.requires_grad_(True)
        return feat.clone()  # differentiable copy downstream; the leaf itself is never modified in place

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        handle.remove()
        torch.set_grad_enabled(grad_mode)
    if "f" not in store:
        raise ValueError(f"layer {path!r} of {type(model).__name__} did not run during the forward")
    logits = check_logits(out, model, type(model).__name__, x.shape[0])
    f = store["f"]
    if method == "cam":
        head = _linear_head(model, f.shape[1], path)
        w, b = head.weight.detach().to(f.dtype), head.bias
        if class_sum:
            maps = torch.einsum("c,bchw->bhw", w.sum(0), f)
            if b is not None:
                maps = maps + b.detach().to(f.dtype).sum()
        else:
            t = _targets(target, logits.detach())
            maps = torch.einsum("bc,bchw->bhw", w[t], f)
            if b is not None:
                maps = maps + b.detach().to(f.dtype)[t].view(-1, 1, 1)
    else:
        if not logits.requires_grad:
            raise ValueError(f"Grad-CAM: the logits of {type(model).__name__} do not depend on layer {path!r}")
        t = _targets(target, logits.detach())
        with torch.enable_grad():  # also under an outer no_grad (the forward above re-enabled it at the layer)
            score = logits.gather(1, t.view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(score, f)
        alpha = grad.mean(dim=(2, 3))  # (B, C): GAP of the gradients
        maps = F.relu(torch.einsum("bc,bchw->bhw", alpha, f.detach()))
    maps = _postprocess(maps.detach(), tuple(x.shape[-2:]), upsample, normalize)
    return logits.detach(), maps


def cam(
    model: nn.Module,
    x: Tensor,
    layer: str | None = None,
    *,
    class_sum: bool = True,
    target: int | Tensor | None = None,
    upsample: bool = True,
    normalize: bool = True,
) -> Tensor:
    """Class activation map (Zhou et al. 2016) of ``x`` (B, C_in, H, W) at ``layer`` -> (B, H, W).

    With f (B, C, h, w) the layer's map and ``model.classifier`` (an ``nn.Linear`` W (K, C), b (K,) applied
    after global average pooling of f):

    - ``class_sum=True`` (paper-faithful, Guo et al.): CAM = Σ_c (W_c · f) + Σ_c b_c = (Σ_c W_c)·f + Σ_c b_c per
      spatial position — whose spatial mean is Σ_c logit_c;
    - ``class_sum=False``: CAM of one class, W_t · f + b_t, for ``target`` (int or (B,); default: predicted).

    ``layer``: dotted module path (default :func:`default_cam_layer`: the last stage / last ``nn.Conv2d``).
    Then bilinearly upsampled to (H, W) (``upsample``) and min-max normalized to [0, 1] per image
    (``normalize``; a constant map becomes all zeros). Runs without grad in eval mode; the model's modes are
    restored. ``ValueError`` if the model has no conv layer, no linear ``classifier``, or ``layer`` is unknown.
    """
    with eval_mode(model):
        return attention_forward(
            model, x, layer, "cam", class_sum=class_sum, target=target, upsample=upsample, normalize=normalize
        )[1]


def grad_cam(
    model: nn.Module,
    x: Tensor,
    layer: str | None = None,
    target: int | Tensor | None = None,
    *,
    upsample: bool = True,
    normalize: bool = True,
) -> Tensor:
    """Grad-CAM (Selvaraju et al. 2017) of ``x`` (B, C_in, H, W) at ``layer`` -> (B, H, W).

    α_c = mean over positions of ∂ logit_t / ∂ f_c for the ``target`` class (int or (B,); default: the
    predicted class), map = ReLU(Σ_c α_c f_c); upsampled and min-max normalized as :func:`cam`. For a linear
    head after global average pooling of f this is ReLU(W_t · f) / (h·w): the bias-free target-class CAM
    after a ReLU, identical after the min-max normalization. Eval mode, modes restored; parameter gradients
    are not touched. Works for any differentiable head (no ``classifier`` needed).
    """
    with eval_mode(model):
        return attention_forward(model, x, layer, "gradcam", target=target, upsample=upsample, normalize=normalize)[1]


def attention_masks(maps: Tensor, threshold: float = 0.4) -> Tensor:
    """Binary attention masks ``maps >= threshold`` (bool, same shape) of min-max normalized maps in [0, 1]."""
    if not isinstance(maps, Tensor) or not maps.is_floating_point():
        raise ValueError("maps must be a floating tensor of normalized attention maps, e.g. from cam()/grad_cam()")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1] (maps are min-max normalized), got {threshold!r}")
    return maps >= threshold


def _check_masks(masks: Sequence[Tensor]) -> list[Tensor]:
    if len(masks) == 1 and isinstance(masks[0], list | tuple):
        masks = tuple(masks[0])
    masks = list(masks)
    if len(masks) < 2:
        raise ValueError(f"attention IoU needs at least 2 masks (one per model), got {len(masks)}")
    for i, m in enumerate(masks):
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            raise ValueError(f"mask {i} must be a bool tensor; turn maps into masks with attention_masks(maps, 0.4)")
        if m.shape != masks[0].shape:
            raise ValueError(f"all masks must have the same shape, got {tuple(masks[0].shape)} and {tuple(m.shape)}")
        if m.dim() < 2:
            raise ValueError(f"masks must be (H, W) or (B, H, W), got shape {tuple(m.shape)}")
    if masks[0].dim() == 2:
        masks = [m.unsqueeze(0) for m in masks]
    return masks


def _inter_union(masks: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-image |∩_k M_k| and |∪_k M_k| (B,) int64."""
    inter, union = masks[0].clone(), masks[0].clone()
    for m in masks[1:]:
        m = m.to(inter.device)
        inter &= m
        union |= m
    return inter.flatten(1).sum(1), union.flatten(1).sum(1)


def attention_iou(*masks: Tensor) -> dict[str, Any]:
    """IoU of k ≥ 2 attention masks (each (B, H, W) or (H, W) bool), ∩ and ∪ taken over all k masks.

    Returns ``{"iou": Σ_b|∩| / Σ_b|∪| (pooled over the set, float), "per_image": (B,) float64 per-image IoU,
    "intersection": Σ|∩|, "union": Σ|∪|}``. An empty union (all masks empty) counts as identical masks: IoU 1.
    """
    ms = _check_masks(masks)
    inter, union = _inter_union(ms)
    per_image = torch.where(union > 0, inter.double() / union.clamp_min(1).double(), torch.ones_like(inter.double()))
    i_sum, u_sum = int(inter.sum()), int(union.sum())
    return {
        "iou": i_sum / u_sum if u_sum > 0 else 1.0,
        "per_image": per_image,
        "intersection": i_sum,
        "union": u_sum,
    }


class IoUAccumulator:
    """Streaming attention IoU for fixed groups of model names (each group: ∩ / ∪ over all its masks).

    :meth:`compute` returns ``"iou/A-B[-C...]"`` (pooled Σ∩/Σ∪ over all images) and ``"iou_img/A-B[-C...]"``
    (mean of the per-image IoUs) per group, and ``"n"`` (images).
    """

    def __init__(self, groups: Sequence[Sequence[str]]) -> None:
        self.groups = [tuple(str(n) for n in g) for g in groups]
        if not self.groups or any(len(g) < 2 for g in self.groups):
            raise ValueError(f"IoUAccumulator needs groups of at least 2 names, got {self.groups}")
        self._sums = torch.zeros(len(self.groups), 3, dtype=torch.float64)  # Σ∩, Σ∪, Σ per-image IoU
        self.n = 0

    def update(self, masks: Mapping[str, Tensor]) -> None:
        """Add one batch of ``{name: (B, H, W) bool masks}``."""
        batch = None
        for i, g in enumerate(self.groups):
            missing = [n for n in g if n not in masks]
            if missing:
                raise ValueError(f"IoUAccumulator.update: no masks for {missing} (got {sorted(masks)})")
            r = attention_iou(*[masks[n] for n in g])
            self._sums[i, 0] += r["intersection"]
            self._sums[i, 1] += r["union"]
            self._sums[i, 2] += r["per_image"].sum().item()
            batch = r["per_image"].shape[0]
        self.n += int(batch or 0)

    def compute(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("IoUAccumulator: no images were added")
        out: dict[str, float] = {}
        for (i_sum, u_sum, img_sum), g in zip(self._sums.tolist(), self.groups, strict=True):
            key = "-".join(g)
            out[f"iou/{key}"] = i_sum / u_sum if u_sum > 0 else 1.0
            out[f"iou_img/{key}"] = img_sum / self.n
        out["n"] = float(self.n)
        return out


def layers_for(named: Mapping[str, nn.Module], layer: LayerArg) -> dict[str, str]:
    """``{model name: CAM layer path}`` from one path, a per-model mapping or None (each model's default layer);
    every path is checked to exist."""
    if layer is None or isinstance(layer, str):
        layers = {n: layer for n in named}
    elif isinstance(layer, Mapping):
        unknown = [k for k in layer if k not in named]
        if unknown:
            raise ValueError(f"layer mapping names unknown models {unknown}; models are {list(named)}")
        layers = {n: layer.get(n) for n in named}
    else:
        raise ValueError(f"layer must be None, a dotted path, or {{model name: path}}, got {type(layer).__name__}")
    out = {}
    for n, m in named.items():
        path = layers[n]
        out[n] = default_cam_layer(m) if path is None else path
        get_layer(m, out[n], role=f"model {n!r}")
    return out


def iou_groups(names: Sequence[str]) -> list[tuple[str, ...]]:
    """The groups attention IoU is reported for: every pair of ``names``, then all of them when there are >= 3."""
    groups = list(combinations(names, 2))
    if len(names) >= 3:
        groups.append(tuple(names))
    return groups


def attention_iou_over_loader(
    models: ModelsArg,
    loader: Iterable,
    *,
    method: str = "cam",
    layer: LayerArg = None,
    threshold: float = 0.4,
    device: str | torch.device | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Attention IoU of k ≥ 2 models over the whole ``loader``: every pair, plus the whole set when k ≥ 3.

    Maps: :func:`cam` (class-summed) or :func:`grad_cam` (predicted class) per ``method`` (``"cam"`` |
    ``"gradcam"``) at ``layer`` (one path for all, ``{name: path}``, or ``None``: :func:`default_cam_layer`),
    masks at ``threshold``. Keys as :class:`IoUAccumulator` (``"iou/A-B"``, ``"iou_img/A-B"``, ``"iou/A-B-C"``,
    ``"n"``); sequences of models are named ``"M0", "M1", ...``.
    """
    named = named_models(models, "attention_iou_over_loader", min_count=2)
    if method not in CAM_METHODS:
        raise ValueError(f"method must be one of {CAM_METHODS}, got {method!r}")
    attention_masks(torch.zeros(1), threshold)  # validates threshold
    layers = layers_for(named, layer)
    acc = IoUAccumulator(iou_groups(list(named)))
    with eval_mode(*named.values()):
        for x, _ in iter_batches(loader, max_batches, "attention_iou_over_loader"):
            masks = {}
            for name, m in named.items():
                _, maps = attention_forward(m, x.to(device_for(m, device)), layers[name], method)
                masks[name] = attention_masks(maps, threshold).cpu()
            acc.update(masks)
    return acc.compute()
