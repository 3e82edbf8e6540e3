"""The distiller registry: ``@register_distiller(name, task=...)`` on a :class:`Distiller` subclass, looked up by
task and name.

Each task has its own table, so one name may mean a classification and a detection method (``"wkd_l"``):
:data:`DISTILLERS` is the classification table (``task="classification"``, the default everywhere), in
registration order (the order of the imports in ``ckakd.train.distillers``); the detection package
(``ckakd.detection.distillers``) registers its methods under ``task="detection"`` when imported.
:func:`registered_distillers` gives a task's table, :func:`get_distiller` a class, :func:`distiller_name` the
name a class is registered as, :func:`build_distiller` builds one with validated keyword arguments (the
trainer's ``distiller.name`` / ``distiller.kwargs``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch.nn as nn

from .base import Distiller, teacher_list

__all__ = [
    "DISTILLERS",
    "TEACHER_COUNTS",
    "CLASSIFICATION",
    "register_distiller",
    "registered_distillers",
    "get_distiller",
    "distiller_name",
    "distiller_arguments",
    "build_distiller",
]

CLASSIFICATION = "classification"  # the default task
DISTILLERS: dict[str, type[Distiller]] = {}  # the classification table
# task -> {name: class}; a task's table appears with its first registration
_TABLES: dict[str, dict[str, type[Distiller]]] = {CLASSIFICATION: DISTILLERS}
# How many teachers a registered method takes: "one", "optional" (zero or one) or "many" (a list of one or more).
TEACHER_COUNTS = ("one", "optional", "many")
_TEACHERS: dict[tuple[str, str], str] = {}  # (task, name) -> teacher count

D = TypeVar("D", bound=type[Distiller])


def register_distiller(name: str, *, teachers: str = "one", task: str = CLASSIFICATION) -> Callable[[D], D]:
    """Class decorator: register a :class:`Distiller` subclass as ``name`` of ``task`` for :func:`build_distiller`.

    ``teachers``: ``"one"`` (default), ``"optional"`` (none or one) or ``"many"`` (the class takes the list).
    ``task``: the table (``"classification"`` by default; the detection methods use ``"detection"``).
    ``ValueError`` for a name already registered for that task (names are never silently replaced).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a distiller name must be a non-empty string, got {name!r}")
    if not isinstance(task, str) or not task:
        raise ValueError(f"a distiller task must be a non-empty string, got {task!r}")
    if teachers not in TEACHER_COUNTS:
        raise ValueError(f"teachers must be one of {', '.join(map(repr, TEACHER_COUNTS))}; got {teachers!r}")

    def decorator(cls: D) -> D:
        if not (isinstance(cls, type) and issubclass(cls, Distiller)):
            raise TypeError(f"register_distiller({name!r}) decorates Distiller subclasses, got {cls!r}")
        table = _TABLES.setdefault(task, {})
        if name in table:
            where = "" if task == CLASSIFICATION else f" for task {task!r}"
            raise ValueError(
                f"distiller name {name!r} is already registered{where} (to {table[name].__module__}."
                f"{table[name].__qualname__}); pick another name"
            )
        table[name] = cls
        _TEACHERS[(task, name)] = teachers
        return cls

    return decorator


def registered_distillers(task: str = CLASSIFICATION) -> dict[str, type[Distiller]]:
    """``{name: class}`` of ``task`` in registration order (empty for a task nothing registered into)."""
    return dict(_TABLES.get(task, {}))


def get_distiller(name: str, task: str = CLASSIFICATION) -> type[Distiller]:
    """The class registered as ``name`` for ``task``; ``ValueError`` naming the valid names for an unknown one."""
    table = _TABLES.get(task, {})
    if name not in table:
        if task == CLASSIFICATION:
            raise ValueError(f"unknown distiller {name!r}; valid names: {', '.join(table)}")
        if not table:
            raise ValueError(
                f"no distillers are registered for task {task!r} (the detection methods register when "
                "ckakd.detection.distillers is imported)"
            )
        raise ValueError(f"unknown {task} distiller {name!r}; valid names: {', '.join(table)}")
    return table[name]


def distiller_name(cls: type[Distiller], task: str = CLASSIFICATION) -> str:
    """The name ``cls`` itself (not a parent) is registered as for ``task``; ``KeyError`` when it is not."""
    for name, registered in _TABLES.get(task, {}).items():
        if registered is cls:
            return name
    raise KeyError(f"{cls.__qualname__} is not a registered {task} distiller")


def distiller_arguments(cls: type[Distiller], *, required: bool = False) -> list[str]:
    """The keyword arguments ``cls`` takes after the student and the teacher(s) (``required=True``: only those
    without a default), in signature order."""
    params = list(inspect.signature(cls.__init__).parameters.values())[3:]  # self, student, teacher(s)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds and not (required and p.default is not inspect.Parameter.empty)]


def build_distiller(
    name: str,
    student: nn.Module,
    teachers: nn.Module | Sequence[nn.Module] | None,
    *,
    task: str = CLASSIFICATION,
    **kwargs: Any,
) -> Distiller:
    """Build ``registered_distillers(task)[name](student, teacher(s), **kwargs)``.

    ``teachers``: one module, a sequence of modules or ``None``; a list goes only to ``"ensemble_kd"``, every
    other method takes exactly one teacher (``"ce"``: optional). ``ValueError`` for an unknown name, unknown
    or missing keyword arguments, and a missing or extra teacher.
    """
    cls = get_distiller(name, task)
    accepted = distiller_arguments(cls)
    renamed = getattr(cls.__init__, "renamed_arguments", {})  # old spellings: accepted with a DeprecationWarning
    unknown = sorted(set(kwargs) - set(accepted) - set(renamed))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for distiller {name!r} ({cls.__name__}); accepted: {accepted}")
    missing = [n for n in distiller_arguments(cls, required=True) if n not in kwargs]
    if missing:
        raise ValueError(f"distiller {name!r} ({cls.__name__}) requires the argument(s) {missing}")
    count = _TEACHERS[(task, name)]
    tlist = teacher_list(teachers)
    if not tlist and count != "optional":
        raise ValueError(f"distiller {name!r} needs a teacher, got none")
    if count == "many":
        return cls(student, tlist, **kwargs)
    if len(tlist) > 1:
        raise ValueError(f"distiller {name!r} takes one teacher, got {len(tlist)}; use 'ensemble_kd' for several")
    return cls(student, tlist[0] if tlist else None, **kwargs)
