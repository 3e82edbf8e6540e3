"""Optimizer and learning-rate scheduler classes by name, their keyword arguments checked against the class
signature, and parameter groups by glob over parameter names, and the optimizer step over accumulated gradients.

``optim.name``: ``sgd`` / ``adamw`` (the built-in recipes), any :mod:`torch.optim` class by name, case-insensitive
(``Adam``, ``rmsprop``), or a dotted path to an :class:`~torch.optim.Optimizer` subclass (``torch.optim.NAdam``,
``my_pkg.MyOpt``). ``schedule.kind``: the built-in ``step`` / ``cosine`` / ``constant``, any
:mod:`torch.optim.lr_scheduler` class by name (``OneCycleLR``, ``cosineannealinglr``) or a dotted path. Errors are
in the config loader's style and name the key (``unknown config key 'optim.kwargs.betaz' (did you mean 'betas'?)``).
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from ..schema import suggest

__all__ = [
    "BUILTIN_OPTIMIZERS",
    "accumulated_step",
    "BUILTIN_SCHEDULES",
    "OPTIMIZER_FIELDS",
    "assign_param_groups",
    "check_class_kwargs",
    "class_parameters",
    "optimizer_class",
    "optimizer_kwargs",
    "scheduler_class",
    "trainable_names",
    "trainable_parameters",
]

BUILTIN_OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
BUILTIN_SCHEDULES = ("step", "cosine", "constant")
# what optim.lr / weight_decay / momentum / nesterov set: passed to a class only when its signature takes them, and
# never through optim.kwargs (one home for each setting)
OPTIMIZER_FIELDS = ("lr", "weight_decay", "momentum", "nesterov")


def _classes(module: Any, base: type) -> dict[str, type]:
    """Public subclasses of ``base`` defined in ``module``, keyed by lower-case name."""
    return {
        name.lower(): obj
        for name, obj in vars(module).items()
        if isinstance(obj, type) and issubclass(obj, base) and obj is not base and not name.startswith("_")
    }


def _suggest(word: str, options: Sequence[str]) -> str:
    """:func:`~ckakd.train.schema.suggest` ignoring case (``rmsprob`` -> ``'RMSprop'``)."""
    lower = {o.lower(): o for o in options}
    hint = suggest(word.lower(), list(lower))
    match = hint[len(" (did you mean '") : -len("'?)")] if hint else ""
    return f" (did you mean {lower[match]!r}?)" if match in lower else ""


def _import_dotted(path: str, key: str, what: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{key}: cannot import {module_name!r} for {what} {path!r}: {exc}") from None
    if not hasattr(module, attr):
        raise ValueError(f"{key}: module {module_name!r} has no {attr!r}{suggest(attr, dir(module))}")
    return getattr(module, attr)


def optimizer_class(name: str, key: str = "optim.name") -> type[torch.optim.Optimizer]:
    """The optimizer class ``name`` refers to (see the module docstring); ``ValueError`` naming ``key`` else."""
    if name in BUILTIN_OPTIMIZERS:
        return BUILTIN_OPTIMIZERS[name]
    if "." in name:
        cls = _import_dotted(name, key, "the optimizer")
    else:
        known = _classes(torch.optim, torch.optim.Optimizer)
        if name.lower() not in known:
            names = sorted(c.__name__ for c in known.values())
            raise ValueError(
                f"{key}: unknown optimizer {name!r}{_suggest(name, [*BUILTIN_OPTIMIZERS, *names])}; expected sgd, "
                f"adamw, a torch.optim class ({', '.join(names)}) or a dotted path (my_pkg.MyOptimizer)"
            )
        cls = known[name.lower()]
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"{key}: {name!r} is {cls!r}, not a torch.optim.Optimizer subclass")
    return cls


def scheduler_class(name: str, key: str = "schedule.kind") -> type | None:
    """The :mod:`torch.optim.lr_scheduler` class ``name`` refers to; ``None`` for a built-in schedule."""
    if name in BUILTIN_SCHEDULES:
        return None
    sched = torch.optim.lr_scheduler
    if "." in name:
        cls = _import_dotted(name, key, "the scheduler")
    else:
        known = _classes(sched, sched.LRScheduler)
        known.pop("lrscheduler", None)
        if name.lower() not in known:
            names = sorted(c.__name__ for c in known.values())
            builtins = ", ".join(repr(b) for b in BUILTIN_SCHEDULES)
            raise ValueError(
                f"{key}: expected one of {builtins}, a torch.optim.lr_scheduler class ({', '.join(names)}) or a "
                f"dotted path (my_pkg.MySchedule){_suggest(name, [*BUILTIN_SCHEDULES, *names])}"
            )
        cls = known[name.lower()]
    if not (isinstance(cls, type) and issubclass(cls, sched.LRScheduler | sched.ReduceLROnPlateau)):
        raise ValueError(f"{key}: {name!r} is {cls!r}, not a torch.optim.lr_scheduler.LRScheduler subclass")
    return cls


def class_parameters(cls: type) -> tuple[dict[str, inspect.Parameter], bool]:
    """The keyword parameters of ``cls.__init__`` after its first argument (params / optimizer), and whether it
    takes ``**kwargs``."""
    params = list(inspect.signature(cls.__init__).parameters.values())[2:]  # self, params/optimizer
    named = {p.name: p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return named, any(p.kind is p.VAR_KEYWORD for p in params)


def check_class_kwargs(
    cls: type, kwargs: Mapping[str, Any], key: str, *, reserved: Mapping[str, str] = {}, given: Sequence[str] = ()
) -> None:
    """``ValueError`` for a keyword of ``kwargs`` (the mapping at config key ``key``) that ``cls`` does not take
    (in the loader's style: the valid keys listed), that ``reserved`` maps to the setting to use instead, or a
    required parameter of ``cls`` that neither ``kwargs`` nor ``given`` (the names the trainer passes) holds."""
    named, open_ended = class_parameters(cls)
    valid = [n for n in named if n not in reserved]
    for k in kwargs:
        if k in reserved:
            raise ValueError(f"{key}.{k}: set {reserved[k]} instead (not in {key})")
        if k not in named and not open_ended:
            raise ValueError(
                f"unknown config key '{key}.{k}'{suggest(k, valid)}; valid keys under '{key}' ({cls.__name__}): "
                + ", ".join(valid)
            )
    missing = [n for n, p in named.items() if p.default is p.empty and n not in kwargs and n not in given]
    if missing:
        raise ValueError(f"{key}: {cls.__name__} needs {', '.join(repr(m) for m in missing)} (set {key}.{missing[0]})")


def optimizer_kwargs(cls: type, name: str, fields: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The keywords an optimizer is built with: for the built-in ``sgd`` (lr, momentum, weight decay, Nesterov) and
    ``adamw`` (lr, weight decay) their recipe, else each of ``fields`` (optim.lr / weight_decay / momentum /
    nesterov) the class takes; then ``kwargs`` (optim.kwargs)."""
    if name == "sgd":
        keep = OPTIMIZER_FIELDS
    elif name == "adamw":
        keep = ("lr", "weight_decay")
    else:
        keep = tuple(class_parameters(cls)[0])
    return {**{k: v for k, v in fields.items() if k in keep}, **kwargs}


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimizer gets: ``model.learnable_parameters()`` (a distiller: student, then projectors) or
    ``model.parameters()``, those that require grad, each once; ``ValueError`` when there is none."""
    learnable = model.learnable_parameters() if hasattr(model, "learnable_parameters") else model.parameters()
    seen: set[int] = set()
    params: list[nn.Parameter] = []
    for p in learnable:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return params


def trainable_names(model: nn.Module, params: Sequence[nn.Parameter]) -> list[str]:
    """The name of each of ``params`` in ``model.named_parameters()`` (``student.fc.weight``,
    ``extra.proj.0.weight`` for a distiller; ``<unnamed i>`` for one the model does not register)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names.get(id(p), f"<unnamed {i}>") for i, p in enumerate(params)]


def assign_param_groups(names: Sequence[str], patterns: Sequence[str], key: str = "optim.param_groups") -> list[int]:
    """For each parameter name, the index of the group whose comma-separated globs (``fnmatch``, ``*`` spans dots)
    match it, ``-1`` for the default group. ``ValueError`` when a group matches nothing or two groups match one
    parameter."""
    owner = [-1] * len(names)
    for g, pattern in enumerate(patterns):
        globs = [p.strip() for p in pattern.split(",") if p.strip()]
        hits = [i for i, n in enumerate(names) if any(fnmatch.fnmatchcase(n, glob) for glob in globs)]
        if not hits:
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
            raise ValueError(f"{key}[{g}].params={pattern!r} matches no trainable parameter; their names: {shown}")
        for i in hits:
            if owner[i] >= 0:
                raise ValueError(
                    f"{key}: parameter {names[i]!r} is matched by {key}[{owner[i]}].params={patterns[owner[i]]!r} "
                    f"and {key}[{g}].params={pattern!r}; a parameter belongs to one group"
                )
            owner[i] = g
    return owner


def accumulated_step(
    optimizer: torch.optim.Optimizer, scaler: Any, params: Sequence[nn.Parameter], window: int, grad_clip: float | None
) -> float | None:
    """One optimizer step (through the AMP ``scaler``) on gradients summed over ``window`` micro-batches: they are
    averaged (divided by ``window``), then clipped to global norm ``grad_clip``; returns the norm before clipping
    (``None`` without clipping). ``window=1``: exactly a plain step."""
    if window > 1 or grad_clip is not None:
        scaler.unscale_(optimizer)
    if window > 1:
        for p in params:
            if p.grad is not None:
                p.grad.div_(window)
    norm = None if grad_clip is None else float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    scaler.step(optimizer)
    scaler.update()
    return norm
