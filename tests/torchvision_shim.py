"""Test-only: import torchvision's Python code where its C++ extension cannot load.

Why: the only torchvision wheel for this torch (``torchvision-0.28.0``, CUDA build) cannot load its ``_C``
extension on a CPU-only torch, and ``import torchvision`` then fails with ``operator torchvision::nms does not
exist``. The detector code (RetinaNet, FCOS, Faster R-CNN, FPN, anchors, losses) is pure Python; only a few
C++ operators are missing. This module defines those operators with :mod:`torch.library` (the schemas of the
wheel's ``_C.so``), gives the two that the detectors run (``nms``, ``roi_align`` and its backward) pure-PyTorch
CPU kernels, and then imports torchvision as if ``_C`` had loaded: the loading of ``torchvision/_C.so`` is
skipped, so ``torchvision.extension._has_ops()`` is true and torchvision's own
``_meta_registrations`` (Meta / fake kernels), ``_autograd_registrations`` (autograd formulas calling
``_roi_align_backward``) and autocast wrappers register on top of these operators exactly as they do on top of
the real ones.

Used only when ``CKAKD_TORCHVISION_SHIM=1`` is set and a plain ``import torchvision`` fails; the folder holding
the unpacked wheel (``pip install --no-deps --target /tmp/tvlib <wheel>``) is taken from ``sys.path`` or from
``CKAKD_TORCHVISION_LIB`` (default ``/tmp/tvlib``). Never used where torchvision imports (the GPU machine).

Operators without a kernel here (``roi_pool``, ``ps_roi_*``, ``deform_conv2d``, ``qnms``, ``qroi_align`` and
their backwards) are defined, so that torchvision's import-time registrations find them, but raise
``NotImplementedError`` when called. Kernels are CPU only.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

__all__ = ["ENV_FLAG", "SHIM_ACTIVE", "load_torchvision", "nms_reference", "roi_align_reference"]

ENV_FLAG = "CKAKD_TORCHVISION_SHIM"
LIB_ENV = "CKAKD_TORCHVISION_LIB"
DEFAULT_LIB = "/tmp/tvlib"

# Schemas as in the wheel's _C.so (torchvision 0.28).
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align": (
        "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
        "int sampling_ratio, bool aligned) -> Tensor"
    ),
    "_roi_align_backward": (
        "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
        "int sampling_ratio, bool aligned) -> Tensor"
    ),
    "qroi_align": (
        "qroi_align(Tensor input, Tensor rois, float input_scale, int input_zero_point, float rois_scale, "
        "int rois_zero_point, float spatial_scale, SymInt pooled_height, SymInt pooled_width, int sampling_ratio, "
        "bool aligned) -> Tensor"
    ),
    "roi_pool": (
        "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
        "-> (Tensor, Tensor)"
    ),
    "_roi_pool_backward": (
        "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor"
    ),
    "ps_roi_align": (
        "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
        "int sampling_ratio) -> (Tensor, Tensor)"
    ),
    "_ps_roi_align_backward": (
        "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
        "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, SymInt channels, "
        "SymInt height, SymInt width) -> Tensor"
    ),
    "ps_roi_pool": (
        "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
        "-> (Tensor, Tensor)"
    ),
    "_ps_roi_pool_backward": (
        "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
        "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, "
        "SymInt width) -> Tensor"
    ),
    "deform_conv2d": (
        "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, "
        "SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, "
        "SymInt offset_groups, bool use_mask) -> Tensor"
    ),
    "_deform_conv2d_backward": (
        "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, "
        "Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
        "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "_cuda_version": "_cuda_version() -> int",
}

# Library objects unregister their operators when garbage collected: keep them for the process's lifetime.
_LIBRARIES: list[torch.library.Library] = []
SHIM_ACTIVE = False


# ---------------------------------------------------------------------------------------------- kernels


def nms_reference(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS as torchvision's CPU kernel: ``dets`` (N, 4) xyxy, ``scores`` (N,) -> kept indices (K,) int64,
    by decreasing score (stable sort); a box is suppressed by a kept one when IoU > ``iou_threshold``
    (areas ``(x2 - x1)·(y2 - y1)``, no +1)."""
    if dets.dim() != 2 or dets.shape[1] != 4 or scores.dim() != 1 or scores.shape[0] != dets.shape[0]:
        raise ValueError(f"nms: dets must be (N, 4) and scores (N,), got {tuple(dets.shape)}, {tuple(scores.shape)}")
    n = dets.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=dets.device)
    order = torch.sort(scores, dim=0, descending=True, stable=True).indices
    b = dets[order]
    x1, y1, x2, y2 = b.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    w = (torch.minimum(x2[:, None], x2[None]) - torch.maximum(x1[:, None], x1[None])).clamp(min=0)
    h = (torch.minimum(y2[:, None], y2[None]) - torch.maximum(y1[:, None], y1[None])).clamp(min=0)
    inter = w * h
    over = (inter / (areas[:, None] + areas[None] - inter) > iou_threshold).cpu().numpy()
    suppressed = np.zeros(n, dtype=bool)
    keep: list[int] = []
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed[i + 1 :] |= over[i, i + 1 :]
    return order[torch.as_tensor(keep, dtype=torch.long, device=dets.device)]


def _axis_weights(
    start: torch.Tensor, bin_size: torch.Tensor, grid: torch.Tensor, pooled: int, size: int
) -> torch.Tensor:
    """Bilinear weights of one axis: (K, pooled, size), summed over the roi's ``grid`` sample points per bin
    (C++ ``bilinear_interpolate``: a sample outside ``[-1, size]`` contributes 0, coordinates clamped at 0,
    the last row/column repeated)."""
    k = start.shape[0]
    g_max = max(int(grid.max()) if k else 0, 1)
    dtype, device = start.dtype, start.device
    p = torch.arange(pooled, dtype=dtype, device=device)
    i = torch.arange(g_max, dtype=dtype, device=device)
    gridf = grid.to(dtype).clamp(min=1)
    coord = (
        start[:, None, None]
        + p[None, :, None] * bin_size[:, None, None]
        + (i[None, None, :] + 0.5) * (bin_size / gridf)[:, None, None]
    )  # (K, pooled, g_max)
    valid = (i[None, None, :] < grid[:, None, None]) & (coord >= -1.0) & (coord <= size)
    coord = coord.clamp(min=0)
    low = coord.floor().long()
    at_end = low >= size - 1
    low = torch.where(at_end, size - 1, low)
    high = torch.where(at_end, size - 1, low + 1)
    coord = torch.where(at_end, low.to(dtype), coord)
    frac = coord - low.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=device)
    w_low = torch.where(valid, 1.0 - frac, zero)
    w_high = torch.where(valid, frac, zero)
    out = torch.zeros(k, pooled, size, dtype=dtype, device=device)
    out.scatter_add_(2, low, w_low)
    out.scatter_add_(2, high, w_high)
    return out


def _roi_align_weights(
    rois: torch.Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    height: int,
    width: int,
    sampling_ratio: int,
    aligned: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch index (K,), Y weights (K, PH, H), X weights (K, PW, W), 1 / count (K,)) of RoIAlign: the bilinear
    sampling is separable, so ``out[k] = Wy[k] @ input[b_k] @ Wx[k]^T / count[k]``."""
    offset = 0.5 if aligned else 0.0
    batch = rois[:, 0].long()
    x1 = rois[:, 1] * spatial_scale - offset
    y1 = rois[:, 2] * spatial_scale - offset
    x2 = rois[:, 3] * spatial_scale - offset
    y2 = rois[:, 4] * spatial_scale - offset
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / pooled_height, roi_w / pooled_width
    if sampling_ratio > 0:
        grid_h = torch.full_like(batch, sampling_ratio)
        grid_w = torch.full_like(batch, sampling_ratio)
    else:
        grid_h = torch.ceil(roi_h / pooled_height).long()
        grid_w = torch.ceil(roi_w / pooled_width).long()
    count = (grid_h * grid_w).clamp(min=1).to(rois.dtype)
    wy = _axis_weights(y1, bin_h, grid_h, pooled_height, height)
    wx = _axis_weights(x1, bin_w, grid_w, pooled_width, width)
    return batch, wy, wx, 1.0 / count


def roi_align_reference(
    input: torch.Tensor,
    rois: torch.Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """RoIAlign forward as torchvision's CPU kernel: ``input`` (N, C, H, W), ``rois`` (K, 5) ``(b, x1, y1, x2,
    y2)`` -> (K, C, PH, PW)."""
    n, c, h, w = input.shape
    k = rois.shape[0]
    out = input.new_zeros(k, c, pooled_height, pooled_width)
    if k == 0:
        return out
    batch, wy, wx, inv = _roi_align_weights(
        rois.to(input.dtype), spatial_scale, pooled_height, pooled_width, h, w, sampling_ratio, aligned
    )
    for b in batch.unique().tolist():
        idx = torch.nonzero(batch == b).flatten()
        out[idx] = torch.einsum("kph,chw,kqw->kcpq", wy[idx], input[b], wx[idx]) * inv[idx, None, None, None]
    return out


def _roi_align_backward_reference(
    grad: torch.Tensor,
    rois: torch.Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    batch_size: int,
    channels: int,
    height: int,
    width: int,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """Gradient of :func:`roi_align_reference` w.r.t. its input: (batch_size, channels, height, width)."""
    out = grad.new_zeros(batch_size, channels, height, width)
    if rois.shape[0] == 0:
        return out
    batch, wy, wx, inv = _roi_align_weights(
        rois.to(grad.dtype), spatial_scale, pooled_height, pooled_width, height, width, sampling_ratio, aligned
    )
    for b in batch.unique().tolist():
        idx = torch.nonzero(batch == b).flatten()
        g = grad[idx] * inv[idx, None, None, None]
        out[b] += torch.einsum("kph,kcpq,kqw->chw", wy[idx], g, wx[idx])
    return out


def _not_implemented(name: str):
    def kernel(*args, **kwargs):
        raise NotImplementedError(
            f"torchvision::{name} has no kernel in tests/torchvision_shim.py (only nms and roi_align do)"
        )

    return kernel


# ------------------------------------------------------------------------------------------ registration


def _define_ops() -> None:
    """Define every ``torchvision::`` operator torchvision's import registers against, with CPU kernels."""
    lib = torch.library.Library("torchvision", "DEF")  # noqa: TOR901 - a test-only operator library
    _LIBRARIES.append(lib)
    for schema in _SCHEMAS.values():
        lib.define(schema)
    kernels = {
        "nms": lambda dets, scores, thr: nms_reference(dets, scores, thr),
        "roi_align": roi_align_reference,
        "_roi_align_backward": _roi_align_backward_reference,
    }
    for name in _SCHEMAS:
        if name == "_cuda_version":
            lib.impl(name, lambda: -1, "CompositeExplicitAutograd")
        else:
            lib.impl(name, kernels.get(name, _not_implemented(name)), "CPU")


def _lib_dir() -> Path | None:
    spec = importlib.util.find_spec("torchvision")
    if spec is not None and spec.origin:
        return Path(spec.origin).parent.parent
    folder = Path(os.environ.get(LIB_ENV, DEFAULT_LIB))
    if (folder / "torchvision" / "__init__.py").is_file():
        sys.path.append(str(folder))
        return folder
    return None


def _purge() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def load_torchvision() -> tuple[ModuleType | None, str]:
    """``(torchvision, how)`` with ``how`` ``"native"`` (a plain import worked) or ``"shim"``; ``(None, reason)``
    when torchvision cannot be had (the shim is used only with ``CKAKD_TORCHVISION_SHIM=1``)."""
    global SHIM_ACTIVE
    if SHIM_ACTIVE:
        return sys.modules["torchvision"], "shim"
    try:
        import torchvision

        return torchvision, "native"
    except Exception as exc:  # the CUDA wheel on a CPU torch: RuntimeError "operator torchvision::nms ..."
        native_error = f"{type(exc).__name__}: {exc}"
    _purge()
    if os.environ.get(ENV_FLAG) != "1":
        return None, f"torchvision is not importable ({native_error}); set {ENV_FLAG}=1 to use the test shim"
    if _lib_dir() is None:
        return None, (
            f"{ENV_FLAG}=1 but no torchvision package: install the wheel with "
            f"`pip install --no-deps --target {DEFAULT_LIB} <torchvision wheel>` (or set {LIB_ENV})"
        )
    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        defined = True
    except RuntimeError:
        defined = False
    if not defined:
        _define_ops()
    original = torch.ops.load_library

    def load_library(path: str) -> None:
        p = Path(path)
        if p.parent.name == "torchvision" and p.name.startswith("_C."):
            return None  # the operators are defined above
        return original(path)

    torch.ops.load_library = load_library
    try:
        tv = importlib.import_module("torchvision")
    except Exception as exc:
        _purge()
        return None, f"torchvision import failed even with the shim: {type(exc).__name__}: {exc}"
    finally:
        torch.ops.__dict__.pop("load_library", None)  # back to the class's method
    if not tv.extension._has_ops():
        return None, "the shim did not make torchvision.extension._has_ops() true"
    SHIM_ACTIVE = True
    return tv, "shim"
