"""COCO instances JSON: the type checks of its fields and annotations, shared by
:class:`~ckakd.detection.data.CocoDetection` and :class:`~ckakd.detection.evaluation.CocoEvaluator`.

A malformed entry is refused with a ``ValueError`` naming the file, the entry and the key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "EMPTY_SECTIONS",
    "Annotation",
    "int_field",
    "is_number",
    "parse_annotation",
    "refuse_duplicates",
    "require_field",
]


def require_field(entry: Any, key: str, where: str) -> Any:
    """``entry[key]``; ``ValueError`` naming ``where`` when ``entry`` is not a JSON object or lacks ``key``."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    if key not in entry:
        raise ValueError(f"{where}: missing required key {key!r}")
    return entry[key]


# why each top-level list of an instances file must not be empty
EMPTY_SECTIONS = {
    "images": "the file lists no images",
    "categories": "the file defines no categories (class labels come from them)",
    "annotations": "the file has no boxes to train on or to score against",
}


def int_field(entry: Any, key: str, where: str, *, positive: bool = False) -> int:
    """``entry[key]`` as an int; ``ValueError`` naming ``where`` and the key for a string, float, bool, null."""
    value = require_field(entry, key, where)
    if isinstance(value, bool) or not isinstance(value, int):
        hint = " (COCO ids and sizes are JSON numbers, not strings)" if isinstance(value, str) else ""
        raise ValueError(f"{where}: {key!r} must be an integer, got {value!r} ({type(value).__name__}){hint}")
    if positive and value <= 0:
        raise ValueError(f"{where}: {key!r} must be positive, got {value}")
    return int(value)


def refuse_duplicates(ids: Sequence[int], what: str, src: str) -> None:
    """``ValueError`` listing the ids that occur more than once (a COCO id names exactly one entry)."""
    seen: set[int] = set()
    dup = sorted({i for i in ids if i in seen or seen.add(i)})
    if dup:
        shown = ", ".join(map(str, dup[:20])) + (f" and {len(dup) - 20} more" if len(dup) > 20 else "")
        raise ValueError(f"{src}: duplicate {what} ids (each must name exactly one {what}): {shown}")


def is_number(v: Any) -> bool:
    """A JSON number (int or float, not a bool)."""
    return isinstance(v, int | float) and not isinstance(v, bool)


@dataclass(frozen=True)
class Annotation:
    """One COCO annotation after the type checks (``bbox`` still the JSON's [x, y, w, h])."""

    index: int
    ann_id: int | None
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]
    area: float | None
    iscrowd: bool


def parse_annotation(ann: Any, where: str, index: int) -> Annotation:
    """Type-check one annotation; ``ValueError`` naming the file, its index and its id otherwise.

    Structural errors (a string id, a bbox that is not 4 numbers, an ``iscrowd`` that is not 0/1, a non-numeric
    ``area``) are refused; bad values (a zero or negative side, NaN, a negative area) are left to the cleaning."""
    if not isinstance(ann, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(ann).__name__}")
    ann_id = int_field(ann, "id", where) if "id" in ann else None
    if ann_id is not None:
        where = f"{where} (annotation id {ann_id})"
    image_id = int_field(ann, "image_id", where)
    category_id = int_field(ann, "category_id", where)
    bbox = require_field(ann, "bbox", where)
    if not isinstance(bbox, list | tuple) or len(bbox) != 4 or not all(is_number(v) for v in bbox):
        raise ValueError(f"{where}: 'bbox' must be 4 numbers [x, y, width, height], got {bbox!r}")
    iscrowd = ann.get("iscrowd", 0)
    if isinstance(iscrowd, str) or iscrowd not in (0, 1):
        raise ValueError(f"{where}: 'iscrowd' must be 0 or 1, got {iscrowd!r}")
    area = ann.get("area")
    if area is not None and not is_number(area):
        raise ValueError(f"{where}: 'area' must be a number, got {area!r} ({type(area).__name__})")
    x, y, w, h = (float(v) for v in bbox)
    return Annotation(
        index, ann_id, image_id, category_id, (x, y, w, h), None if area is None else float(area), bool(iscrowd)
    )
