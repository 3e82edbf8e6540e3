"""torchvision detectors behind ckakd's detector protocol (optional: torchvision is imported lazily).

:class:`TorchvisionDetector` wraps a torchvision ``RetinaNet``, ``FCOS`` or ``FasterRCNN`` so that
:class:`~ckakd.detection.trainer.DetectionDistiller`, the detection trainer and ``evaluate_detector`` use it
like :class:`~ckakd.detection.models.RetinaNet` / :class:`~ckakd.detection.models.FCOS`: ``features``,
``head_outputs``, ``compute_losses``, ``postprocess``, ``forward`` and the attributes ``num_classes``,
``feature_names``, ``num_levels``, ``fpn_channels``, ``strides``. :func:`build_torchvision_detector` builds
one by name (no download unless weights are asked for). ``import ckakd.detection`` (and importing this
module) never imports torchvision; the first adapter built does, with a clear ``ImportError`` when it is
missing (:func:`torchvision_available` checks first).

Design
------
* **No resizing.** The wrapped model's ``transform`` (``GeneralizedRCNNTransform``) is bypassed: images are
  used at the size given, as ckakd's data pipeline (``ResizeBoxes``, ``detection_collate``) resizes and pads
  them, so targets and detections are in the input image's pixels with no mapping. The adapter applies only
  the transform's normalization (``image_mean`` / ``image_std``) and then zero-pads the batch at the bottom and
  right to a multiple of ``transform.size_divisible`` (32 by default), as the transform's ``batch_images`` does:
  torchvision's anchor generator derives each level's stride as ``padded_size // level_size``, which is exact
  only on such padded sizes. ``min_size`` / ``max_size`` therefore have no effect through the adapter (they
  still apply to the wrapped model's own ``model(list_of_images)``). Pixels beyond an image's valid size in a
  collated batch are normalized like the others (torchvision pads after normalizing, with 0).
* **Labels.** ckakd labels are 0-based (``[0, num_classes)``); torchvision's are 1-based with 0 the
  background, and its models have ``num_classes + 1`` outputs (``build_torchvision_detector(name, K)`` builds
  a torchvision model with ``K + 1``). Targets go in as ``label + 1``; detections come out 0-based
  (:func:`to_torchvision_labels` / :func:`from_torchvision_labels`). RetinaNet / FCOS never report the
  background column (it is left out of the post-processing, so it cannot fill the top-k / NMS slots);
  training keeps it, so the losses are exactly torchvision's.
* **Hook path.** ``feature_names == ["model.backbone"]``: one module path whose forward hook sees the
  backbone's output, an ``OrderedDict[str, Tensor]`` of all FPN levels, finest first (keys "0", "1", "2",
  "p6", "p7" for RetinaNet / FCOS; "0"…"3", "pool" for Faster R-CNN). Its values, in order, are exactly
  ``features(images)`` (:meth:`TorchvisionDetector.hooked_levels` turns the hook output into that list).
  This differs from ckakd's own detectors, whose ``feature_names`` are one path per level with a tensor
  output: torchvision computes its extra levels (max-pool "pool", and P6/P7 inside ``fpn.extra_blocks``)
  functionally, so not every level has its own module.
* **Head outputs** (lists per level, finest first; location-major, anchor-minor like ckakd's heads):
  RetinaNet / FCOS: ``"cls_logits"`` (B, H_l·W_l·A, K) — the class columns only, 0-based, what WKD-L on the
  classification branch compares; ``"background_logits"`` (B, H_l·W_l·A, 1), torchvision's column 0, kept
  for its losses; ``"box_regression"`` (B, H_l·W_l·A, 4); FCOS also ``"centerness"`` (B, H_l·W_l, 1).
  Faster R-CNN has no dense class logits (its classes come from the RoI head on sampled proposals), so no
  ``"cls_logits"``; its dense outputs are the RPN's ``"objectness"`` (B, H_l·W_l·A, 1) and
  ``"rpn_box_regression"`` (B, H_l·W_l·A, 4); ``compute_losses`` runs the RPN (proposals, anchor targets,
  losses) on them and then ``roi_heads`` on the given features.
* **Losses** keep torchvision's names: RetinaNet ``classification``, ``bbox_regression``; FCOS also
  ``bbox_ctrness``; Faster R-CNN ``loss_classifier``, ``loss_box_reg``, ``loss_objectness``,
  ``loss_rpn_box_reg``. Faster R-CNN's losses need training mode (torchvision samples proposals and RoIs only
  then).
* ``strides`` / ``levels`` come from one probe forward of the backbone (a 256×256 zero image, eval mode,
  no_grad) when the adapter is built. For the current ``DetectionDistiller``, whose FPN check reads
  ``model.backbone.levels`` and ``model.backbone.out_channels``, ``adapter.backbone`` is the wrapped model's
  backbone and gets a ``levels`` attribute (pyramid levels log2(stride), e.g. (3, 4, 5, 6, 7)) when it has
  none.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import DenseDetector

__all__ = [
    "TORCHVISION_DETECTORS",
    "TorchvisionDetector",
    "build_torchvision_detector",
    "from_torchvision_labels",
    "import_torchvision",
    "to_torchvision_labels",
    "torchvision_available",
]

# torchvision's own builders (torchvision.models.detection.<name>) and their architecture.
_TORCHVISION_BUILDERS: dict[str, str] = {
    "retinanet_resnet50_fpn": "retinanet",
    "retinanet_resnet50_fpn_v2": "retinanet",
    "fcos_resnet50_fpn": "fcos",
    "fasterrcnn_resnet50_fpn": "fasterrcnn",
    "fasterrcnn_resnet50_fpn_v2": "fasterrcnn",
    "fasterrcnn_mobilenet_v3_large_fpn": "fasterrcnn",
    "fasterrcnn_mobilenet_v3_large_320_fpn": "fasterrcnn",
}
# Composed here from torchvision parts, as torchvision's resnet50 builders but with another ResNet depth and a
# choosable FPN width (``fpn_channels``): small CPU students and teachers of the same FPN width.
_COMPOSED: dict[str, tuple[str, str]] = {
    f"{arch}_{net}_fpn": (arch, net)
    for arch in ("retinanet", "fcos", "fasterrcnn")
    for net in ("resnet18", "resnet34", "resnet101", "resnet152")
}
TORCHVISION_DETECTORS: tuple[str, ...] = tuple(sorted(_TORCHVISION_BUILDERS)) + tuple(sorted(_COMPOSED))

_PROBE_SIZE = 256  # the stride probe's image side: exact for strides up to 128 (RetinaNet's P7)


def import_torchvision() -> ModuleType:
    """``torchvision``, or ``ImportError`` saying how to install it (a wheel that does not import — e.g. a
    CUDA build on a CPU-only torch — counts as missing)."""
    try:
        import torchvision
    except Exception as exc:
        raise ImportError(
            f"torchvision detectors need torchvision, which could not be imported ({type(exc).__name__}: {exc}); "
            f"pip install torchvision matching your torch (this is torch {torch.__version__})"
        ) from exc
    return torchvision


def torchvision_available() -> bool:
    """Whether ``import torchvision`` works here."""
    try:
        import_torchvision()
    except ImportError:
        return False
    return True


def to_torchvision_labels(labels: Tensor) -> Tensor:
    """ckakd's 0-based labels (N,) -> torchvision's 1-based labels (0 is torchvision's background)."""
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"labels must be >= 0 (ckakd's 0-based classes), got min {int(labels.min())}")
    return labels + 1


def from_torchvision_labels(labels: Tensor) -> Tensor:
    """torchvision's 1-based labels (N,) -> ckakd's 0-based labels; label 0 (background) is an error."""
    if labels.numel() and int(labels.min()) < 1:
        raise ValueError("labels must be >= 1: torchvision's label 0 is the background, not a class")
    return labels - 1


def _flatten(x: Tensor, c: int) -> Tensor:
    """(B, A·C, H, W) -> (B, H·W·A, C), location-major and anchor-minor (torchvision's permute_and_flatten)."""
    b, _, h, w = x.shape
    return x.view(b, -1, c, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, c)


class TorchvisionDetector(nn.Module):
    """A torchvision ``RetinaNet``, ``FCOS`` or ``FasterRCNN`` (``model``) with ckakd's detector protocol.

    Attributes:
        model: the wrapped torchvision detector (its parameters are this module's, under ``model.``).
        kind: ``"retinanet"``, ``"fcos"`` or ``"fasterrcnn"``.
        num_classes: K = torchvision's class count - 1 (its background class 0 is not a ckakd class).
        feature_names: ``["model.backbone"]``; a forward hook there sees an ``OrderedDict`` of the FPN levels
            (see the module docstring).
        levels: pyramid levels, log2 of ``strides`` (RetinaNet / FCOS: (3, 4, 5, 6, 7); Faster R-CNN with a
            ResNet: (2, 3, 4, 5, 6)).

    ``images`` everywhere: (B, 3, H, W) float in [0, 1] (normalized here with the model's
    ``transform.image_mean`` / ``image_std``, zero-padded to a multiple of ``transform.size_divisible``; never
    resized). ``targets``: list of B dicts with ``"boxes"`` (N, 4) float xyxy pixels and ``"labels"`` (N,)
    int64 in ``[0, num_classes)``. Mask R-CNN / Keypoint R-CNN are rejected (their heads need mask /
    keypoint targets).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        tv = import_torchvision()
        det = tv.models.detection
        if isinstance(model, det.RetinaNet):
            kind, outputs = "retinanet", int(model.head.classification_head.num_classes)
        elif isinstance(model, det.FCOS):
            kind, outputs = "fcos", int(model.head.classification_head.num_classes)
        elif isinstance(model, det.FasterRCNN):
            heads = model.roi_heads
            if heads.has_mask() or heads.has_keypoint():
                raise ValueError(
                    f"model: {type(model).__name__} has a mask or keypoint head; only box detectors are supported"
                )
            kind, outputs = "fasterrcnn", int(heads.box_predictor.cls_score.out_features)
        else:
            raise TypeError(f"model must be a torchvision RetinaNet, FCOS or FasterRCNN, got {type(model).__name__}")
        if outputs < 2:
            raise ValueError(f"model has {outputs} class outputs; it needs the background (0) and at least one class")
        self.model = model
        self.kind = kind
        self.num_classes = outputs - 1
        self.feature_names: list[str] = ["model.backbone"]
        keys, strides = self._probe()
        self._level_keys: list[str] = keys
        self._strides: tuple[int, ...] = strides
        self.levels: tuple[int, ...] = tuple(int(round(math.log2(s))) for s in strides)
        if not hasattr(model.backbone, "levels"):  # DetectionDistiller's FPN check reads backbone.levels
            model.backbone.levels = self.levels

    # ---- protocol attributes ------------------------------------------------------------------------------

    @property
    def backbone(self) -> nn.Module:
        """The wrapped model's backbone (``model.backbone``, a ``BackboneWithFPN`` for the built-in models)."""
        return self.model.backbone

    @property
    def strides(self) -> tuple[int, ...]:
        """Stride of each FPN level, finest first."""
        return self._strides

    @property
    def num_levels(self) -> int:
        """Number of FPN levels that :meth:`features` returns."""
        return len(self._strides)

    @property
    def fpn_channels(self) -> int:
        """Channels of every FPN level (``model.backbone.out_channels``)."""
        return int(self.model.backbone.out_channels)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, num_classes={self.num_classes}, strides={self._strides}"

    def _probe(self) -> tuple[list[str], tuple[int, ...]]:
        """Level names and strides from one no-grad eval forward of the backbone on a zero image."""
        backbone = self.model.backbone
        ref = next(iter(backbone.parameters()), None)
        device = ref.device if ref is not None else torch.device("cpu")
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        modes = [(m, m.training) for m in backbone.modules()]
        backbone.eval()  # no BatchNorm statistics from the probe
        try:
            with torch.no_grad():
                out = backbone(torch.zeros(1, 3, _PROBE_SIZE, _PROBE_SIZE, device=device, dtype=dtype))
        finally:
            for m, mode in modes:
                m.training = mode
        if isinstance(out, Tensor):
            out = OrderedDict([("0", out)])
        strides = tuple(_PROBE_SIZE // int(f.shape[-2]) for f in out.values())
        return list(out.keys()), strides

    # ---- features and heads -------------------------------------------------------------------------------

    def _check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a float tensor (B, C, H, W), got {shape}")
        channels = len(self.model.transform.image_mean)
        if images.shape[1] != channels:
            raise ValueError(f"images must have {channels} channels (the model's image_mean), got {images.shape[1]}")

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, H', W'): normalized with the model's mean / std, zero-padded at the
        bottom and right to H', W' multiples of ``transform.size_divisible``; no resizing."""
        self._check_images(images)
        tr = self.model.transform
        mean = torch.as_tensor(tr.image_mean, dtype=images.dtype, device=images.device)
        std = torch.as_tensor(tr.image_std, dtype=images.dtype, device=images.device)
        x = (images - mean[:, None, None]) / std[:, None, None]
        div = max(1, int(tr.size_divisible))
        h, w = images.shape[-2:]
        ph, pw = math.ceil(h / div) * div - h, math.ceil(w / div) * div - w
        return F.pad(x, (0, pw, 0, ph)) if ph or pw else x

    def features(self, images: Tensor) -> list[Tensor]:
        """FPN levels of ``images`` (B, 3, H, W): list of (B, fpn_channels, H_l, W_l), finest first, with
        ``H_l = ceil(H' / stride_l)`` for the padded size H' (see :meth:`preprocess`)."""
        return self.hooked_levels(self.model.backbone(self.preprocess(images)))

    @staticmethod
    def hooked_levels(output: Any) -> list[Tensor]:
        """What a forward hook on ``feature_names[0]`` sees (an ``OrderedDict`` of levels, or one tensor) ->
        the list that :meth:`features` returns."""
        if isinstance(output, Tensor):
            return [output]
        if isinstance(output, dict):
            return list(output.values())
        raise TypeError(f"expected the backbone's OrderedDict of FPN levels, got {type(output).__name__}")

    def _feature_dict(self, features: Sequence[Tensor]) -> OrderedDict[str, Tensor]:
        if len(features) != len(self._level_keys):
            raise ValueError(f"expected {len(self._level_keys)} FPN levels, got {len(features)}")
        return OrderedDict(zip(self._level_keys, features, strict=True))

    def head_outputs(self, features: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        """Per-level dense head outputs (lists, finest level first; see the module docstring for the keys):
        RetinaNet / FCOS ``cls_logits`` (B, H_l·W_l·A, K), ``background_logits`` (B, H_l·W_l·A, 1),
        ``box_regression`` (B, H_l·W_l·A, 4) (+ FCOS ``centerness`` (B, H_l·W_l, 1)); Faster R-CNN ``objectness``
        (B, H_l·W_l·A, 1) and ``rpn_box_regression`` (B, H_l·W_l·A, 4)."""
        features = list(features)
        if self.kind == "fasterrcnn":
            objectness, deltas = self.model.rpn.head(features)
            return {
                "objectness": [_flatten(o, 1) for o in objectness],
                "rpn_box_regression": [_flatten(d, 4) for d in deltas],
            }
        raw = self.model.head(features)
        hw = [f.shape[-2] * f.shape[-1] for f in features]
        anchors = raw["cls_logits"].shape[1] // sum(hw)
        counts = [n * anchors for n in hw]
        cls = raw["cls_logits"].split(counts, dim=1)
        out = {
            "cls_logits": [c[..., 1:] for c in cls],
            "background_logits": [c[..., :1] for c in cls],
            "box_regression": list(raw["bbox_regression"].split(counts, dim=1)),
        }
        if self.kind == "fcos":
            out["centerness"] = list(raw["bbox_ctrness"].split(counts, dim=1))
        return out

    # ---- losses and detections ----------------------------------------------------------------------------

    def _image_list(self, images: Tensor, image_sizes: Sequence[tuple[int, int]] | None) -> Any:
        tv = import_torchvision()
        sizes = DenseDetector._image_sizes(self, image_sizes, images)  # same checks as ckakd's detectors
        return tv.models.detection.image_list.ImageList(self.preprocess(images), sizes)

    def _torchvision_targets(self, targets: Sequence[dict[str, Tensor]], batch: int) -> list[dict[str, Tensor]]:
        DenseDetector._check_targets(self, targets, batch)  # same checks and messages as ckakd's detectors
        return [{"boxes": t["boxes"], "labels": to_torchvision_labels(t["labels"])} for t in targets]

    def _rpn(
        self, head_outputs: dict[str, list[Tensor]], features: list[Tensor], image_list: Any
    ) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
        """torchvision's RegionProposalNetwork.forward from given head outputs: (proposals per image, anchors per
        image, objectness (B·N, 1), deltas (B·N, 4))."""
        rpn = self.model.rpn
        anchors = rpn.anchor_generator(image_list, features)
        counts = [o.shape[1] for o in head_outputs["objectness"]]
        objectness = torch.cat(head_outputs["objectness"], dim=1).flatten(0, -2)
        deltas = torch.cat(head_outputs["rpn_box_regression"], dim=1).reshape(-1, 4)
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, _ = rpn.filter_proposals(proposals, objectness, image_list.image_sizes, counts)
        return boxes, anchors, objectness, deltas

    def compute_losses(
        self,
        head_outputs: dict[str, list[Tensor]],
        features: Sequence[Tensor],
        images: Tensor,
        targets: Sequence[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """torchvision's training losses (scalars, torchvision's names) from :meth:`head_outputs` and
        :meth:`features` of ``images`` (B, 3, H, W); targets with 0-based labels. Faster R-CNN's proposals are
        clipped to the batch tensor's H, W (the protocol passes no per-image sizes here)."""
        features = list(features)
        image_list = self._image_list(images, None)
        tv_targets = self._torchvision_targets(targets, images.shape[0])
        if self.kind == "fasterrcnn":
            if not self.training:
                raise RuntimeError(
                    "Faster R-CNN losses need training mode (torchvision samples proposals and RoIs only then): "
                    "call .train() first"
                )
            rpn = self.model.rpn
            proposals, anchors, objectness, deltas = self._rpn(head_outputs, features, image_list)
            labels, matched_boxes = rpn.assign_targets_to_anchors(anchors, tv_targets)
            regression_targets = rpn.box_coder.encode(matched_boxes, anchors)
            loss_objectness, loss_rpn_box_reg = rpn.compute_loss(objectness, deltas, labels, regression_targets)
            _, losses = self.model.roi_heads(
                self._feature_dict(features), proposals, image_list.image_sizes, tv_targets
            )
            return {**losses, "loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg}
        full = {
            "cls_logits": torch.cat(
                [
                    torch.cat([bg, c], dim=-1)
                    for bg, c in zip(head_outputs["background_logits"], head_outputs["cls_logits"], strict=True)
                ],
                dim=1,
            ),
            "bbox_regression": torch.cat(head_outputs["box_regression"], dim=1),
        }
        anchors = self.model.anchor_generator(image_list, features)
        if self.kind == "retinanet":
            return self.model.compute_loss(tv_targets, full, anchors)
        full["bbox_ctrness"] = torch.cat(head_outputs["centerness"], dim=1)
        hw = [f.shape[-2] * f.shape[-1] for f in features]
        return self.model.compute_loss(tv_targets, full, anchors, hw)

    @torch.no_grad()
    def postprocess(
        self,
        head_outputs: dict[str, list[Tensor]],
        features: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        images: Tensor,
    ) -> list[dict[str, Tensor]]:
        """torchvision's post-processing: per image ``{"boxes": (D, 4) xyxy pixels clipped to its
        ``image_sizes`` entry, "scores": (D,), "labels": (D,) int64 0-based}``. ``images``: the batch the
        features came from (its padded shape places the anchors)."""
        features = list(features)
        image_list = self._image_list(images, image_sizes)
        if self.kind == "fasterrcnn":
            proposals, _, _, _ = self._rpn(head_outputs, features, image_list)
            dets, _ = self.model.roi_heads(self._feature_dict(features), proposals, image_list.image_sizes)
            return [
                {"boxes": d["boxes"], "scores": d["scores"], "labels": from_torchvision_labels(d["labels"])}
                for d in dets
            ]
        anchors = self.model.anchor_generator(image_list, features)
        counts = [c.shape[1] for c in head_outputs["cls_logits"]]
        split = {"cls_logits": head_outputs["cls_logits"], "bbox_regression": head_outputs["box_regression"]}
        if self.kind == "fcos":
            split["bbox_ctrness"] = head_outputs["centerness"]
        split_anchors = [list(a.split(counts)) for a in anchors]
        dets = self.model.postprocess_detections(split, split_anchors, image_list.image_sizes)
        return [{"boxes": d["boxes"], "scores": d["scores"], "labels": d["labels"]} for d in dets]

    def forward(
        self,
        images: Tensor,
        targets: Sequence[dict[str, Tensor]] | None = None,
        image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training with ``targets``: dict of scalar losses. Otherwise: list of per-image detection dicts
        (boxes clipped to ``image_sizes``, default the tensor's H, W)."""
        feats = self.features(images)
        outs = self.head_outputs(feats)
        if self.training and targets is not None:
            return self.compute_losses(outs, feats, images, targets)
        sizes = DenseDetector._image_sizes(self, image_sizes, images)
        return self.postprocess(outs, feats, sizes, images)


# ---------------------------------------------------------------------------------------------- builders


def _composed(
    tv: ModuleType,
    arch: str,
    net: str,
    num_outputs: int,
    weights_backbone: Any,
    trainable_backbone_layers: int | None,
    fpn_channels: int,
    **kwargs: Any,
) -> nn.Module:
    """torchvision's resnet50 recipe for ``arch`` with ResNet ``net``: BatchNorm (FrozenBatchNorm2d with
    backbone weights), C3-C5 + P6/P7 from P5 (RetinaNet, FCOS) or C2-C5 + max-pool level (Faster R-CNN)."""
    from torchvision.models import resnet
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops import misc
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

    if fpn_channels < 1:
        raise ValueError(f"fpn_channels must be positive, got {fpn_channels}")
    trained = weights_backbone is not None
    if not trained:  # as torchvision: without weights every layer trains
        trainable_backbone_layers = 5
    elif trainable_backbone_layers is None:
        trainable_backbone_layers = 3
    if not 0 <= trainable_backbone_layers <= 5:
        raise ValueError(f"trainable_backbone_layers must lie in [0, 5], got {trainable_backbone_layers}")
    body = getattr(resnet, net)(
        weights=weights_backbone, norm_layer=misc.FrozenBatchNorm2d if trained else nn.BatchNorm2d
    )
    train_layers = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_backbone_layers]
    if trainable_backbone_layers == 5:
        train_layers.append("bn1")
    for name, p in body.named_parameters():
        if not name.startswith(tuple(train_layers)):
            p.requires_grad_(False)
    stages, extra = (
        ([2, 3, 4], LastLevelP6P7(fpn_channels, fpn_channels))
        if arch != "fasterrcnn"
        else ([1, 2, 3, 4], LastLevelMaxPool())
    )
    c2 = body.inplanes // 8  # C2's channels (64 for BasicBlock ResNets, 256 for Bottleneck)
    backbone = BackboneWithFPN(
        body,
        {f"layer{k}": str(i) for i, k in enumerate(stages)},
        [c2 * 2 ** (k - 1) for k in stages],
        fpn_channels,
        extra_blocks=extra,
    )
    det = tv.models.detection
    cls = {"retinanet": det.RetinaNet, "fcos": det.FCOS, "fasterrcnn": det.FasterRCNN}[arch]
    return cls(backbone, num_outputs, **kwargs)


def build_torchvision_detector(
    name: str,
    num_classes: int,
    *,
    weights: Any = None,
    weights_backbone: Any = None,
    **kwargs: Any,
) -> TorchvisionDetector:
    """A :class:`TorchvisionDetector` around a torchvision detector built by name, with ``num_classes``
    ckakd classes (torchvision gets ``num_classes + 1`` outputs, background included).

    Names (:data:`TORCHVISION_DETECTORS`): torchvision's builders ``retinanet_resnet50_fpn``,
    ``retinanet_resnet50_fpn_v2``, ``fcos_resnet50_fpn``, ``fasterrcnn_resnet50_fpn``,
    ``fasterrcnn_resnet50_fpn_v2``, ``fasterrcnn_mobilenet_v3_large_fpn``,
    ``fasterrcnn_mobilenet_v3_large_320_fpn``; and ``{retinanet,fcos,fasterrcnn}_{resnet18,resnet34,resnet101,
    resnet152}_fpn``, composed here with torchvision's resnet50 recipe and an extra ``fpn_channels`` keyword
    (default 256; FCOS's GroupNorm(32) needs a multiple of 32).

    ``weights`` / ``weights_backbone`` default to ``None``: random initialization, nothing downloaded
    (torchvision's own defaults would fetch ImageNet backbone weights). Pretrained detector weights fix
    torchvision's class count (COCO: 91 = 90 ckakd classes + background); composed names take only
    ``weights_backbone``. Other keywords (``min_size``, ``max_size``, ``trainable_backbone_layers``,
    ``score_thresh``, ``nms_thresh``, ``detections_per_img``, ...) go to the builder / model class;
    ``min_size`` / ``max_size`` only matter for the wrapped model's own forward, never through the adapter.
    """
    if name not in _TORCHVISION_BUILDERS and name not in _COMPOSED:
        raise ValueError(f"name must be one of {list(TORCHVISION_DETECTORS)}, got {name!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    tv = import_torchvision()
    if name in _TORCHVISION_BUILDERS:
        if "fpn_channels" in kwargs:
            raise ValueError(f"fpn_channels is only for the composed names (e.g. retinanet_resnet18_fpn), not {name!r}")
        builder = getattr(tv.models.detection, name, None)
        if builder is None:
            raise ValueError(f"name: torchvision {tv.__version__} has no detector builder {name!r}")
        model = builder(weights=weights, weights_backbone=weights_backbone, num_classes=num_classes + 1, **kwargs)
    else:
        if weights is not None:
            raise ValueError(f"weights: {name!r} has no pretrained detector weights (use weights_backbone)")
        arch, net = _COMPOSED[name]
        trainable = kwargs.pop("trainable_backbone_layers", None)
        fpn_channels = int(kwargs.pop("fpn_channels", 256))
        model = _composed(tv, arch, net, num_classes + 1, weights_backbone, trainable, fpn_channels, **kwargs)
    return TorchvisionDetector(model)
