"""The distiller registry: ``@register_distiller(name)`` on a :class:`Distiller` subclass, looked up by name.

:data:`DISTILLERS` maps each registered name to its class in registration order (the order of the imports in
``ckakd.train.distillers``); :func:`get_distiller` returns the class, :func:`build_distiller` builds one with
validated keyword arguments (the trainer's ``distiller.name`` / ``distiller.kwargs``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch.nn as nn

from .base import Distiller, _teacher_list

__all__ = ["DISTILLERS", "TEACHER_COUNTS", "register_distiller", "get_distiller", "build_distiller"]

DISTILLERS: dict[str, type[Distiller]] = {}
# How many teachers a registered method takes: "one", "optional" (zero or one) or "many" (a list of one or more).
TEACHER_COUNTS = ("one", "optional", "many")
_TEACHERS: dict[str, str] = {}

D = TypeVar("D", bound=type[Distiller])


def register_distiller(name: str, *, teachers: str = "one") -> Callable[[D], D]:
    """Class decorator: register a :class:`Distiller` subclass as ``name`` for :func:`build_distiller`.

    ``teachers``: ``"one"`` (default), ``"optional"`` (none or one) or ``"many"`` (the class takes the list).
    ``ValueError`` for a name already registered (names are never silently replaced).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a distiller name must be a non-empty string, got {name!r}")
    if teachers not in TEACHER_COUNTS:
        raise ValueError(f"teachers must be one of {', '.join(map(repr, TEACHER_COUNTS))}; got {teachers!r}")

    def decorator(cls: D) -> D:
        if not (isinstance(cls, type) and issubclass(cls, Distiller)):
            raise TypeError(f"register_distiller({name!r}) decorates Distiller subclasses, got {cls!r}")
        if name in DISTILLERS:
            raise ValueError(
                f"distiller name {name!r} is already registered (to {DISTILLERS[name].__module__}."
                f"{DISTILLERS[name].__qualname__}); pick another name"
            )
        DISTILLERS[name] = cls
        _TEACHERS[name] = teachers
        return cls

    return decorator


def get_distiller(name: str) -> type[Distiller]:
    """The class registered as ``name``; ``ValueError`` naming the valid names for an unknown one."""
    if name not in DISTILLERS:
        raise ValueError(f"unknown distiller {name!r}; valid names: {', '.join(DISTILLERS)}")
    return DISTILLERS[name]


def build_distiller(
    name: str,
    student: nn.Module,
    teachers: nn.Module | Sequence[nn.Module] | None,
    **kwargs: Any,
) -> Distiller:
    """Build ``DISTILLERS[name](student, teacher(s), **kwargs)``.

    ``teachers``: one module, a sequence of modules or ``None``; a list goes only to ``"ensemble_kd"``, every
    other method takes exactly one teacher (``"ce"``: optional). ``ValueError`` for an unknown name, unknown
    or missing keyword arguments, and a missing or extra teacher.
    """
    cls = get_distiller(name)
    params = list(inspect.signature(cls.__init__).parameters.values())[3:]  # self, student, teacher(s)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = [p.name for p in params if p.kind in kinds]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for distiller {name!r} ({cls.__name__}); accepted: {accepted}")
    required = [p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]
    missing = [n for n in required if n not in kwargs]
    if missing:
        raise ValueError(f"distiller {name!r} ({cls.__name__}) requires the argument(s) {missing}")
    count = _TEACHERS[name]
    tlist = _teacher_list(teachers)
    if not tlist and count != "optional":
        raise ValueError(f"distiller {name!r} needs a teacher, got none")
    if count == "many":
        return cls(student, tlist, **kwargs)
    if len(tlist) > 1:
        raise ValueError(f"distiller {name!r} takes one teacher, got {len(tlist)}; use 'ensemble_kd' for several")
    return cls(student, tlist[0] if tlist else None, **kwargs)
