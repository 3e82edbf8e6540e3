"""Feature distillation for detectors on FPN outputs: PCKA and the "w/ patch" baselines of Zhou et al., IJCAI 2024.

The losses on tensors are defined in :mod:`ckakd.patch_baselines` and re-exported here under their old names
(``pcka_loss``, ``pcka_inter``, ``kd_patch_loss``, ``at_patch_loss``, ``dist_patch_loss``, ``mmd_patch_loss``,
``wkd_feature_fpn_loss``, ``patchify``, ``level_patch_size``, ``default_resize``, ``MIX_ORDER``); they take lists
of paired FPN levels ``(B, C, H, W)`` (student, teacher; same channels — use ``PatchMimic`` projectors when
they differ). ``PATCH_LOSSES`` maps the detection trainer's method names to them.

WKD-L on the classification branch (``wkd_logit_dense_loss``) takes the per-level class logits instead
(``head_outputs(...)["cls_logits"]``); its ground cost comes from :func:`detection_class_interrelation`
(category interrelations of the teacher, pooled from its features inside the ground-truth boxes) and
``ckakd.cost_from_interrelation``, extended with a background bin by :func:`with_background_cost`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ckakd
from ckakd import _checks
from ckakd.detection.data import make_detection_loader
from ckakd.detection.ops import roi_align
from ckakd.interrelation import InterrelationBuilder, interrelation
from ckakd.patch_baselines import MIX_ORDER as MIX_ORDER  # importable here as before
from ckakd.patch_baselines import (
    at_patch_loss,
    default_resize,
    dist_patch_loss,
    kd_patch_loss,
    level_patch_size,
    mmd_patch_loss,
    paired_lists,
    paired_maps,
    patchify,
    pcka_inter,
    pcka_loss,
    wkd_feature_fpn_loss,
)

__all__ = [
    "patchify",
    "level_patch_size",
    "pcka_loss",
    "pcka_inter",
    "default_resize",
    "kd_patch_loss",
    "mmd_patch_loss",
    "wkd_feature_fpn_loss",
    "wkd_logit_dense_loss",
    "with_background_cost",
    "select_confident_locations",
    "detection_class_interrelation",
    "box_levels",
    "roi_features",
    "at_patch_loss",
    "dist_patch_loss",
    "PatchMimic",
    "PATCH_LOSSES",
]


# ------------------------------------------------------------------------------ WKD-L on the cls branch


def _cls_levels(s_cls: Tensor | Sequence[Tensor], t_cls: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Validate per-level (B, N_l, K) student / teacher logits; return them concatenated over levels (B, N, K)."""
    s_list, t_list = paired_lists(s_cls, t_cls, "s_cls and t_cls", "levels")
    for i, (s, t) in enumerate(zip(s_list, t_list, strict=True)):
        for name, x in (("s_cls", s), ("t_cls", t)):
            if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 3:
                got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"{name}[{i}] must be floating-point class logits (B, N_l, K), got {got}")
        if s.shape != t.shape:
            raise ValueError(
                f"level {i}: student cls logits {tuple(s.shape)} and teacher {tuple(t.shape)} differ; WKD-L needs "
                "the same batch, anchor/point layout (N_l = H_l·W_l·A) and classes K"
            )
        if s.device != t.device:
            raise ValueError(f"level {i}: s_cls on {s.device}, t_cls on {t.device}; inputs must be on one device")
        first = s_list[0]
        if (s.shape[0], s.shape[2]) != (first.shape[0], first.shape[2]):
            raise ValueError(
                f"every level needs the same batch B and classes K: level 0 has {tuple(first.shape)}, "
                f"level {i} has {tuple(s.shape)}"
            )
    return torch.cat(s_list, dim=1), torch.cat(t_list, dim=1)


def with_background_cost(cost: Tensor, background_cost: float = 1.0) -> Tensor:
    """(K, K) class cost -> (K+1, K+1) with a background bin last: cost ``background_cost`` between background
    and every class, 0 background to background. The default 1 is the supremum of ``cost_from_interrelation``'s
    costs (1 − e^{−κD} < 1): confusing an object with background costs more than confusing two classes."""
    _checks.check_float_tensor("cost", cost)
    if cost.dim() != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"cost must be a square (K, K) matrix, got shape {tuple(cost.shape)}")
    if not (math.isfinite(background_cost) and background_cost >= 0):
        raise ValueError(f"background_cost must be finite and >= 0, got {background_cost}")
    k = cost.shape[0]
    full = cost.new_full((k + 1, k + 1), float(background_cost))
    full[:k, :k] = cost
    full[k, k] = 0.0
    return full


def select_confident_locations(t_cls: Tensor, *, score_thresh: float = 0.05, topk: int | None = 100) -> Tensor:
    """Teacher logits (B, N, K) -> bool mask (B, N): locations whose top sigmoid score is >= ``score_thresh``,
    at most ``topk`` per image (the highest; None: no cap)."""
    conf = torch.sigmoid(t_cls.detach()).amax(-1)
    mask = conf >= score_thresh
    if topk is not None and topk < conf.shape[1]:
        keep = torch.zeros_like(mask)
        keep.scatter_(1, conf.topk(topk, dim=1).indices, True)
        mask &= keep
    return mask


def wkd_logit_dense_loss(
    s_cls: Tensor | Sequence[Tensor],
    t_cls: Tensor | Sequence[Tensor],
    cost: Tensor,
    *,
    temperature: float = 2.0,
    weight: float = 30.0,
    score_thresh: float = 0.05,
    topk: int | None = 100,
    background: bool = True,
    background_cost: float = 1.0,
    confidence_weighting: bool = True,
    eps: float = 0.05,
    iters: int = 10,
    tol: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """WKD-L (discrete Wasserstein distance over classes) on a dense detector's sigmoid classification branch.

    s_cls, t_cls: per-level class logits (B, N_l, K) of student and teacher with the same anchor/point layout
    (``head_outputs(...)["cls_logits"]``); the teacher is detached. cost: (K, K) class cost
    (``ckakd.cost_from_interrelation``), or (K+1, K+1) with the background bin last (``with_background_cost``;
    pass it pre-built to reuse ``ckakd.sinkhorn``'s per-cost cache). Returns a scalar.

    From sigmoid heads to class distributions: a sigmoid logit z_k is the log-odds of class k against "no
    object"; for one object per location (COCO's case) that is the multinomial model with a background class
    of logit 0, p_k = e^{z_k} / (1 + Σ_j e^{z_j}), p_bg = 1 / (1 + Σ_j e^{z_j}) — the (K+1)-way softmax of a
    Faster R-CNN RoI head, where the WKD paper applied WKD-L. So each location's distribution is
    softmax([z_1..z_K, 0] / T) over K+1 bins (``background=False``: softmax(z / T) over the K classes, which
    drops how confident the location is). Only the locations where the teacher sees an object are compared —
    top teacher sigmoid >= ``score_thresh`` (RetinaNet's inference threshold by default), at most ``topk``
    per image over all levels — since otherwise the ~99 % background locations dominate. Each selected
    location's WD is weighted by that teacher confidence (``confidence_weighting``), and the loss is
    ``weight · Σ w_i WD_i / Σ w_i`` with WD_i = ``ckakd.sinkhorn(p_s, p_t, cost, eps=eps, iters=iters)``
    (WKD's 10 fixed iterations at ε = 0.05; ``tol`` for the converged mode). Entropic WD is not 0 at
    p_s = p_t: the floor is the entropic self-transport cost ⟨P_ε(p_t, p_t), C⟩ (→ 0 as ε → 0).
    T = 2 and weight 30 are WKD's ImageNet settings (the WKD authors' public code). No selected location in the
    batch: 0, still attached to the student's graph (zero gradient).
    """
    zs, zt = _cls_levels(s_cls, t_cls)
    _checks.check_float_tensor("cost", cost)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= score_thresh <= 1.0:
        raise ValueError(f"score_thresh must lie in [0, 1], got {score_thresh}")
    if topk is not None and (not isinstance(topk, int) or isinstance(topk, bool) or topk < 1):
        raise ValueError(f"topk must be a positive int or None, got {topk!r}")
    k = zs.shape[-1]
    if background and cost.shape == (k, k):
        cost = with_background_cost(cost, background_cost)
    bins = k + 1 if background else k
    if cost.shape != (bins, bins):
        want = f"({k}, {k}) or ({k + 1}, {k + 1}) (background bin last)" if background else f"({k}, {k})"
        raise ValueError(f"cost must be {want} for K={k} classes, got {tuple(cost.shape)}")
    zt = zt.detach()
    mask = select_confident_locations(zt, score_thresh=score_thresh, topk=topk)
    work = torch.float64 if torch.float64 in (zs.dtype, zt.dtype) else torch.float32
    if not bool(mask.any()):
        return (zs.sum() * 0.0).to(work)
    ls, lt = zs[mask].to(work), zt[mask].to(work)  # (M, K)
    if background:
        ls, lt = F.pad(ls, (0, 1)), F.pad(lt, (0, 1))  # the background logit 0
    p, q = F.softmax(ls / temperature, dim=1), F.softmax(lt / temperature, dim=1)
    wd = ckakd.sinkhorn(p, q, cost, eps=eps, iters=iters, tol=tol, backend=backend, validate=False)  # (M,)
    if not confidence_weighting:
        return weight * wd.mean()
    w = torch.sigmoid(lt[:, :k]).amax(1)
    return weight * (w * wd).sum() / w.sum().clamp_min(torch.finfo(work).tiny)


def box_levels(boxes: Tensor, strides: Sequence[int], cells: float = 4.0) -> Tensor:
    """Boxes (N, 4) xyxy pixels -> (N,) index of the FPN level on which each box spans about ``cells``
    strides (sqrt of its area; RetinaNet's anchors are 4 strides wide): argmin_l |log2(√(wh) / cells) − log2 s_l|."""
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp_min(1e-6)
    side = wh.prod(1).sqrt()
    log_strides = torch.log2(torch.tensor([float(s) for s in strides], dtype=boxes.dtype, device=boxes.device))
    return (torch.log2(side / cells)[:, None] - log_strides[None]).abs().argmin(1)


def roi_features(feature: Tensor, boxes: Tensor, stride: int, output_size: int = 7) -> Tensor:
    """RoIAlign of one image's level map with one bilinear sample per bin: a map (C, H, W) of stride ``stride`` and
    boxes (n, 4) xyxy image pixels -> (n, C, S, S), the map sampled at the S×S bin centers of every box (cell (i, j)
    is centered at pixel ((j + ½)·stride, (i + ½)·stride)): :func:`~ckakd.detection.ops.roi_align` with
    ``sampling_ratio=1, aligned=True`` (a sample more than half a cell outside the map gives 0)."""
    if feature.dim() != 3 or boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(
            f"expected feature (C, H, W) and boxes (n, 4), got {tuple(feature.shape)} and {tuple(boxes.shape)}"
        )
    boxes = boxes.to(feature.dtype)
    rois = torch.cat([boxes.new_zeros(boxes.shape[0], 1), boxes], dim=1)
    return roi_align(feature[None], rois, int(output_size), 1.0 / stride, sampling_ratio=1, aligned=True)


ROI_SOURCES = ("cls_tower", "fpn")


def _classifier_weights(teacher: nn.Module) -> Tensor:
    """(K, A·C·kh·kw) per-class weights of the teacher's classification conv (output channel a·K + k)."""
    conv = getattr(getattr(teacher, "head", None), "cls_logits", None)
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"kernel='cosine' needs teacher.head.cls_logits (a Conv2d), {type(teacher).__name__} has none")
    k = int(teacher.num_classes)
    weight = conv.weight.detach()
    a = weight.shape[0] // k
    return weight.reshape(a, k, -1).transpose(0, 1).reshape(k, -1)


@torch.no_grad()
def detection_class_interrelation(
    teacher: nn.Module,
    dataset: Any = None,
    *,
    kernel: str = "cka",
    source: str = "cls_tower",
    samples_per_class: int = 32,
    roi_size: int = 7,
    feature_layout: str = "rows",
    degree: int = 2,
    batch_size: int = 8,
    max_images: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Tensor:
    """Category interrelation IR (K, K) of a detector teacher (RetinaNet / FCOS) for WKD-L's cost
    (``ckakd.cost_from_interrelation(ir)``): symmetric, in [-1, 1], unit diagonal, float32.

    Per class, teacher features of its ground-truth objects: every box of ``dataset`` (items (image, target),
    target "boxes" (N, 4) xyxy pixels and "labels" (N,) 0-based: ``SyntheticDigitsDetection``,
    ``CocoDetection``) is RoI-aligned (:func:`roi_features`, ``roi_size``²) on the FPN level where it spans about
    4 strides (:func:`box_levels`). ``source="cls_tower"`` (default) pools the output of the teacher's
    classification tower — the input of its classifier conv, the analogue of the penultimate features WKD
    computes IR from in classification (and of the RoI-head features of the Faster R-CNN it used for
    detection); ``"fpn"`` pools the FPN levels, shared with box regression. The kernels are
    ``ckakd.interrelation``'s, streamed by :class:`ckakd.InterrelationBuilder`: "cka" (WKD's best), "poly",
    "rbf" take ``samples_per_class`` boxes per class (``feature_layout="rows"``: one flattened C·S² row per
    box; "spatial": every RoI bin a row) and stop once every class has them; "centroid" reads the whole
    dataset (or ``max_images``). ``kernel="cosine"`` needs no data: cosine of the per-class weights of the
    teacher's classifier conv (WKD's classifier-weight ablation; weaker than feature CKA there). The
    teacher is run in eval mode, under no_grad, on ``device`` (default: its parameters' device); its mode is
    restored. A class with too few boxes raises ``ValueError`` naming it.
    """
    if not hasattr(teacher, "features") or not hasattr(teacher, "num_classes") or not hasattr(teacher, "strides"):
        raise TypeError(f"teacher must be a DenseDetector (RetinaNet / FCOS), got {type(teacher).__name__}")
    if kernel == "cosine":
        return interrelation(_classifier_weights(teacher).float(), kernel="cosine")
    if source not in ROI_SOURCES:
        raise ValueError(f"source must be one of {ROI_SOURCES}, got {source!r}")
    tower = getattr(getattr(teacher, "head", None), "cls_tower", None)
    if source == "cls_tower" and not isinstance(tower, nn.Module):
        raise TypeError(f"source='cls_tower' needs teacher.head.cls_tower, {type(teacher).__name__} has none")
    if dataset is None:
        raise ValueError(f"kernel={kernel!r} needs a dataset of (image, target) items (only 'cosine' needs none)")
    if not isinstance(roi_size, int) or roi_size < 1:
        raise ValueError(f"roi_size must be a positive int, got {roi_size!r}")
    num_classes = int(teacher.num_classes)
    builder = InterrelationBuilder(
        num_classes, kernel=kernel, samples_per_class=samples_per_class, feature_layout=feature_layout, degree=degree
    )
    if device is None:
        device = next(iter(teacher.parameters())).device
    strides = [int(s) for s in teacher.strides]
    loader = make_detection_loader(dataset, batch_size=batch_size, shuffle=False, seed=0)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=len(loader), desc=f"interrelation ({kernel})", disable=not progress) if tqdm else None
    was_training = teacher.training
    teacher.eval()
    seen = 0
    try:
        for images, targets, _ in loader:
            maps = teacher.features(images.to(device))
            if source == "cls_tower":
                maps = [tower(f) for f in maps]
            rows, labels = [], []
            for b, target in enumerate(targets):
                boxes = torch.as_tensor(target["boxes"]).to(device=device, dtype=maps[0].dtype).reshape(-1, 4)
                lab = torch.as_tensor(target["labels"]).to(device).reshape(-1)
                ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
                boxes, lab = boxes[ok], lab[ok]
                if boxes.numel() == 0:
                    continue
                level = box_levels(boxes, strides)
                for lv in level.unique().tolist():
                    pick = level == lv
                    rows.append(roi_features(maps[lv][b], boxes[pick], strides[lv], roi_size))
                    labels.append(lab[pick])
            if rows:
                feats = torch.cat(rows)
                builder.update(feats.flatten(1) if feature_layout == "rows" else feats, torch.cat(labels).long())
            seen += len(targets)
            if bar is not None:
                bar.update(1)
            if builder.is_full or (max_images is not None and seen >= max_images):
                break
    finally:
        teacher.train(was_training)
        if bar is not None:
            bar.close()
    return builder.compute().float()


PATCH_LOSSES = {
    "pcka": pcka_loss,
    "kd_patch": kd_patch_loss,
    "at_patch": at_patch_loss,
    "dist_patch": dist_patch_loss,
    "mmd_patch": mmd_patch_loss,
}


class PatchMimic(nn.Module):
    """Per-level 1×1 conv projectors student → teacher channels, plus the mimic MSE Zhou et al. (IJCAI 2024) add to PCKA
    ("Ours + mimic", following DIST+mimic): ``forward(f_s) -> projected levels``, ``mimic_loss(f_s, f_t)``."""

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int]) -> None:
        super().__init__()
        if len(in_channels) != len(out_channels):
            raise ValueError(f"got {len(in_channels)} student and {len(out_channels)} teacher levels")
        self.proj = nn.ModuleList(nn.Conv2d(ci, co, 1) for ci, co in zip(in_channels, out_channels, strict=True))

    def forward(self, f_s: Sequence[Tensor]) -> list[Tensor]:
        if len(f_s) != len(self.proj):
            raise ValueError(f"expected {len(self.proj)} FPN levels, got {len(f_s)}")
        return [p(f) for p, f in zip(self.proj, f_s, strict=True)]

    def mimic_loss(self, f_s: Sequence[Tensor], f_t: Sequence[Tensor], weight: float = 1.0) -> Tensor:
        projected = self(f_s)
        pairs = paired_maps(projected, list(f_t))
        return weight * sum(F.mse_loss(s, t) for s, t in pairs)
