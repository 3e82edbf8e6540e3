"""Typed settings as dataclasses: building one from a plain mapping with every key checked, and :func:`plain`.

A schema is a tree of dataclasses whose fields carry type annotations (``int``, ``float | None``, ``Literal[...]``,
``list[int]``, ``tuple[str, str]``, ``dict[str, Any]`` for free-form keyword arguments, nested dataclasses) and
optional value checks (``field(..., metadata=check(positive))``: a function returning an error text or ``None``).
:func:`build_dataclass` turns a mapping (a parsed YAML file) into such a tree, raising :class:`ValueError` naming
the dotted key on an unknown key (:class:`UnknownKeyError`, with suggestions), a wrong type or a failed check.
Nothing here knows a particular schema; the trainer's sections live in :mod:`ckakd.train.engine.settings` and the
config files in :mod:`ckakd.train.config_files`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import numpy as np
import torch

__all__ = [
    "UnknownKeyError",
    "build_dataclass",
    "check",
    "check_field",
    "coerce",
    "describe",
    "device_name",
    "half_open_unit",
    "join_key",
    "non_empty",
    "non_negative",
    "open_unit",
    "plain",
    "positive",
    "schema_keys",
    "show",
    "suggest",
    "suggest_key",
]

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


# --------------------------------------------------------------------------------------------- value checks
# ``metadata={"check": fn}``; ``fn(value)`` returns an error text or None.


def positive(v: Any) -> str | None:
    """``None`` or ``> 0``."""
    return None if v is None or v > 0 else "must be > 0"


def non_negative(v: Any) -> str | None:
    """``None`` or ``>= 0``."""
    return None if v is None or v >= 0 else "must be >= 0"


def open_unit(v: Any) -> str | None:
    """Strictly between 0 and 1."""
    return None if 0.0 < v < 1.0 else "must be strictly between 0 and 1"


def half_open_unit(v: Any) -> str | None:
    """In ``[0, 1)``."""
    return None if 0.0 <= v < 1.0 else "must be in [0, 1)"


def device_name(v: Any) -> str | None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    return None if _DEVICE_RE.match(v) else "must be 'auto', 'cpu', 'cuda' or 'cuda:N' (N a device index)"


def non_empty(v: Any) -> str | None:
    """``None`` or a string with something besides whitespace."""
    return None if v is None or v.strip() else "must be a non-empty string"


def check(fn: Callable[[Any], str | None]) -> dict[str, Any]:
    """The ``metadata`` of a field whose value ``fn`` checks: ``field(default=1, metadata=check(positive))``."""
    return {"check": fn}


# --------------------------------------------------------------------------------------------- messages


def show(value: Any) -> str:
    """``repr`` (at most 80 characters) and type name, for error messages: ``"'fast' (str)"``."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


_NAMES: dict[Any, tuple[str, str]] = {
    bool: ("a bool (true/false)", "bools"),
    int: ("an int", "ints"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
}


def describe(tp: Any, plural: bool = False) -> str:
    """Human text for an annotation: ``"an int or null"``, ``"a list of [string, string] pairs"``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(describe(a, plural) for a in inner) + " or null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return ("lists" if plural else "a list") + f" of {describe(args[0], plural=True)}"
    if origin is tuple:
        pair = "[" + ", ".join(_NAMES.get(a, (str(a), ""))[1][:-1] for a in args) + "]"
        return f"{pair} pairs" if plural else f"a {pair} pair"
    if origin is dict or tp is dict:
        return "mappings" if plural else "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"{'mappings' if plural else 'a mapping'} ({tp.__name__} fields)"
    singular, many = _NAMES.get(tp, (str(tp), str(tp)))
    return many if plural else singular


def suggest(word: str, options: Sequence[str]) -> str:
    """``" (did you mean 'lr'?)"`` when ``word`` is close to one of ``options``, else ``""``."""
    match = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def join_key(prefix: str, key: str) -> str:
    """``"optim"``, ``"lr"`` -> ``"optim.lr"`` (no dot with an empty prefix)."""
    return f"{prefix}.{key}" if prefix else key


def schema_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the dataclass schema ``cls`` (list items as ``teachers.0.name``)."""
    out: list[str] = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted, tp = join_key(prefix, f.name), hints[f.name]
        args = get_args(tp)
        if dataclasses.is_dataclass(tp):
            out += schema_keys(tp, dotted)
        elif get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
            out += schema_keys(args[0], f"{dotted}.0")
        else:
            out.append(dotted)
    return out


def suggest_key(dotted: str, key: str, keys: Sequence[str]) -> str:
    """``" (did you mean 'schedule.epochs'?)"`` for an unknown ``dotted`` key: schema keys with the same last
    name first, then close last names, then close dotted keys."""
    leaves: dict[str, list[str]] = {}
    for k in keys:
        leaves.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    matches = list(leaves.get(key, []))
    if not matches:
        for leaf in difflib.get_close_matches(key, list(leaves), n=3, cutoff=0.75):
            matches += leaves[leaf]
    if not matches:
        matches = difflib.get_close_matches(dotted, list(keys), n=3, cutoff=0.6)
    matches = [m for m in matches if m != dotted][:3]
    return f" (did you mean {' or '.join(repr(m) for m in matches)}?)" if matches else ""


class UnknownKeyError(ValueError):
    """An unknown key; :meth:`text` with the root schema adds suggestions from the whole schema."""

    def __init__(self, prefix: str, key: str, fields: list[str]) -> None:
        self.prefix, self.key, self.fields = prefix, key, fields
        super().__init__(self.text())

    def text(self, root: type | None = None) -> str:
        """The message; with ``root`` (the schema the whole mapping is built into) keys elsewhere are suggested."""
        dotted = join_key(self.prefix, self.key)
        hint = suggest(self.key, self.fields)
        if not hint and root is not None:
            hint = suggest_key(dotted, self.key, schema_keys(root))
        level = f"under '{self.prefix}'" if self.prefix else "at the top level"
        return f"unknown config key '{dotted}'{hint}; valid keys {level}: " + ", ".join(self.fields)


# --------------------------------------------------------------------------------------------- building


def coerce(value: Any, tp: Any, key: str, expect: str | None = None) -> Any:
    """Check ``value`` against the type annotation ``tp``; return it (floats converted, containers copied).

    ``expect`` replaces the expected-type text in errors (``"an int or null"`` for ``int | None``).
    """
    origin, args = get_origin(tp), get_args(tp)
    want = expect or describe(tp)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:  # pragma: no cover - the schemas use only ``X | None``
            raise TypeError(f"unsupported annotation {tp} for {key}")
        return coerce(value, inner[0], key, want)
    if value is None:
        raise ValueError(f"{key}: expected {want}, got null (this key is not optional)")
    if origin is Literal:
        if not isinstance(value, str) or value not in args:
            hint = suggest(value, args) if isinstance(value, str) else ""
            raise ValueError(f"{key}: expected {want}, got {show(value)}{hint}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected {want}, got {show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected {want}, got {show(value)}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key}: expected {want} (int or float), got {show(value)}")
        if not math.isfinite(value):
            raise ValueError(f"{key}: expected a finite number, got {show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected {want}, got {show(value)} (quote it in YAML)")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{key}: expected {want}, got {show(value)}")
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ValueError(f"{key}: expected {want}, got {show(value)}")
        return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{key}: expected {want} (free-form keyword arguments), got {show(value)}")
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise ValueError(f"{key}: keys must be strings, got {show(bad[0])}")
        return copy.deepcopy(dict(value))
    raise TypeError(f"unsupported annotation {tp} for {key}")  # pragma: no cover - schema bug


def check_field(f: dataclasses.Field, tp: Any, value: Any, key: str) -> Any:
    """``value`` for field ``f`` (annotation ``tp``) coerced (:func:`coerce`) and checked (``f.metadata``'s
    ``check``); ``key`` names it in errors. A ``"convert"`` in ``f.metadata`` (``fn(value, key)``) first brings
    an accepted alternative spelling to the annotated form (e.g. a mapping to a list of pairs)."""
    convert = f.metadata.get("convert")
    if convert is not None:
        value = convert(value, key)
    value = coerce(value, tp, key)
    fn = f.metadata.get("check")
    if fn is not None:
        problem = fn(value)
        if problem:
            raise ValueError(f"{key}: {problem}, got {show(value)}")
    return value


def build_dataclass(cls: type, data: Any, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from mapping ``data`` (``None``: all defaults), every key checked; errors
    name the dotted key under ``prefix``."""
    where = f"'{prefix}'" if prefix else "the config"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{prefix or 'config'}: expected {describe(cls)}, got {show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if not isinstance(key, str):
            raise ValueError(f"{where}: keys must be strings, got {show(key)}")
        if key not in fields:
            raise UnknownKeyError(prefix, key, list(fields))
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        dotted = join_key(prefix, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{dotted}: required key is missing ({describe(hints[name])})")
            continue
        kwargs[name] = check_field(f, hints[name], data[name], dotted)
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------- plain


def plain(obj: Any) -> Any:
    """Recursively convert to the types ``torch.load(weights_only=True)``, JSON and YAML accept: mappings to dicts
    (string keys), lists and tuples to lists, paths to strings, numpy / one-element tensor scalars to numbers."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    return str(obj)
