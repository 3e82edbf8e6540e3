"""Test-only: import torchvision's Python code where its C++ extension cannot load.

Why: the only torchvision wheel for this torch (``torchvision-0.28.0``, CUDA build) cannot load its ``_C``
extension on a CPU-only torch, and ``import torchvision`` then fails with ``operator torchvision::nms does not
exist``. The detector code (RetinaNet, FCOS, Faster R-CNN, FPN, anchors, losses) is pure Python; only a few
C++ operators are missing. This module defines those operators with :mod:`torch.library` (the schemas of the
wheel's ``_C.so``), gives the two that the detectors run (``nms``, ``roi_align`` and its backward) the
package's pure-PyTorch fallbacks as CPU kernels (``ckakd.detection.ops``: ``nms_fallback``,
``roi_align_fallback``, ``roi_align_backward_fallback``, which ``ckakd`` itself runs where torchvision does not
import), and then imports torchvision as if ``_C`` had loaded: the loading of ``torchvision/_C.so`` is
skipped, so ``torchvision.extension._has_ops()`` is true and torchvision's own ``_meta_registrations`` (Meta /
fake kernels), ``_autograd_registrations`` (autograd formulas calling ``_roi_align_backward``) and autocast
wrappers register on top of these operators exactly as they do on top of the real ones.

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

import torch

from ckakd.detection.ops import nms_fallback, roi_align_backward_fallback, roi_align_fallback

__all__ = ["ENV_FLAG", "SHIM_ACTIVE", "load_torchvision"]

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
        "nms": nms_fallback,
        "roi_align": roi_align_fallback,
        "_roi_align_backward": roi_align_backward_fallback,
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
