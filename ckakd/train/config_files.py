"""Config files: YAML reading and writing, ``base:`` inheritance, dotted overrides, the shipped configs by name, and
the task registry that turns the resulting mapping into a typed config.

A config file is a YAML mapping; ``base: <name or relative path>`` merges another file underneath (child wins;
mappings merged, lists replaced), ``key=value`` overrides patch the result, and its ``task:`` (default
``classification``) selects the schema registered for that task (:func:`register_task`; the classification schema
is :mod:`ckakd.train.config`, the detection schema :mod:`ckakd.detection.config`, which registers when imported).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .schema import UnknownKeyError, build_dataclass, plain, show, suggest

__all__ = [
    "TaskSchema",
    "apply_overrides",
    "config_from_dict",
    "config_path",
    "configs_root",
    "dump_yaml",
    "list_configs",
    "load_config",
    "load_raw_config",
    "parse_override",
    "register_task",
    "registered_tasks",
]

YAML_SUFFIXES = (".yaml", ".yml")


# --------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class TaskSchema:
    """A ``task:`` value's config class, the checks across its sections (``check(cfg)`` raises ``ValueError``)
    and the text :func:`load_config` shows for a file without keys."""

    schema: type
    check: Callable[[Any], None]
    empty_hint: str = ""


_TASKS: dict[str, TaskSchema] = {}


def register_task(name: str, schema: type, check: Callable[[Any], None], empty_hint: str = "") -> None:
    """Make ``task: <name>`` configs build into the dataclass ``schema`` (then ``check(cfg)``)."""
    _TASKS[name] = TaskSchema(schema, check, empty_hint)


def registered_tasks() -> dict[str, TaskSchema]:
    """The registered tasks (``{"classification": ..., "detection": ...}`` once ckakd.detection is imported)."""
    return dict(_TASKS)


def config_from_dict(d: Mapping[str, Any] | None) -> Any:
    """Validate a plain nested mapping (as in the YAML, without ``base:``) and build the config of its ``task``
    (default ``classification``: :class:`ckakd.train.config.Config`)."""
    task = d.get("task", "classification") if isinstance(d, Mapping) else "classification"
    if not isinstance(task, str) or task not in _TASKS:
        hint = suggest(task, list(_TASKS)) if isinstance(task, str) else ""
        known = ", ".join(map(repr, _TASKS))
        where = " (detection configs need the detection package: import ckakd.detection.config)"
        raise ValueError(f"task: expected one of {known}, got {show(task)}{hint}{where if task == 'detection' else ''}")
    entry = _TASKS[task]
    try:
        cfg = build_dataclass(entry.schema, d, "")
    except UnknownKeyError as exc:
        raise ValueError(exc.text(entry.schema)) from None
    entry.check(cfg)
    return cfg


# --------------------------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` (no dot) as a float, as YAML 1.2 and users expect."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as exc:
        raise ValueError(f"{source}: invalid YAML: {exc}") from exc


class _Dumper(yaml.SafeDumper):
    """Block-style mappings; lists of scalars (and of scalar pairs) inline: ``milestones: [150, 180, 210]``."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flat = all(not isinstance(v, dict | list) or (isinstance(v, list) and _scalars(v)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


def _scalars(data: list) -> bool:
    return all(not isinstance(v, dict | list) for v in data)


_Dumper.add_representer(list, _represent_list)


def dump_yaml(data: Mapping[str, Any]) -> str:
    """``data`` (made :func:`~ckakd.train.schema.plain`) as YAML: keys in order, short lists inline."""
    return yaml.dump(plain(data), Dumper=_Dumper, sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------------------------- shipped configs


def configs_root() -> Path:
    """The folder of the shipped configs: the ``ckakd.configs`` package (``ckakd/configs/`` in the source tree,
    package data in a regular install)."""
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec("ckakd.configs")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) for p in spec.submodule_search_locations]
    candidates.append(Path(__file__).resolve().parents[1] / "configs")
    for c in candidates:
        if c.is_dir() and any(c.rglob("*.yaml")):
            return c
    raise FileNotFoundError(
        "the shipped configs were not found (looked in: " + ", ".join(str(c) for c in candidates) + "); "
        "reinstall ckakd (`pip install --no-build-isolation -e .`)"
    )


def list_configs() -> list[str]:
    """Sorted names of the shipped configs (``"digits/rcka"``, ...), usable in :func:`load_config`."""
    root = configs_root()
    names = {p.relative_to(root).with_suffix("").as_posix() for s in YAML_SUFFIXES for p in root.rglob(f"*{s}")}
    return sorted(names)


def config_path(name: str) -> Path:
    """File of the shipped config ``name`` (``"digits/rcka"``; a ``.yaml`` suffix is optional)."""
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix in YAML_SUFFIXES else name
    stem = stem.replace("\\", "/").strip("/")
    root = configs_root()
    if stem and ".." not in stem.split("/"):
        for s in YAML_SUFFIXES:
            p = root / f"{stem}{s}"
            if p.is_file():
                return p
    names = list_configs()
    raise ValueError(f"no shipped config named {name!r}{suggest(stem, names)}; shipped configs: " + ", ".join(names))


def _locate(ref: str, relative_to: Path | None) -> Path:
    """A config reference: an existing file (relative to ``relative_to`` or the cwd), else a shipped name."""
    raw = Path(os.path.expanduser(ref))
    candidates = [raw] if raw.is_absolute() else [(relative_to or Path.cwd()) / raw]
    if raw.suffix not in YAML_SUFFIXES:
        candidates += [c.with_name(c.name + s) for c in list(candidates) for s in YAML_SUFFIXES]
    for c in candidates:
        if c.is_file():
            return c
    try:
        return config_path(ref)
    except ValueError as exc:
        if raw.suffix in YAML_SUFFIXES or raw.is_absolute():
            raise ValueError(f"config file not found: {candidates[0]} (and no shipped config {ref!r})") from None
        raise exc from None


# --------------------------------------------------------------------------------------------- inheritance


def _deep_merge(base: dict[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``: mappings merged recursively, everything else (lists too) replaced; a null
    where the parent has a mapping (an empty YAML section) keeps the parent's mapping."""
    out = copy.deepcopy(base)
    for k, v in child.items():
        if v is None and isinstance(out.get(k), Mapping):
            continue  # an empty section (all lines commented out) keeps the parent's
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _load_file(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """The mapping in ``path`` with its ``base:`` chain merged underneath."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(path) :], path))
        raise ValueError(f"config inheritance cycle: {cycle}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path}: not a YAML config (a binary file? byte {exc.object[exc.start]:#04x} at offset {exc.start} is "
            "not UTF-8 text)"
        ) from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    if "\x00" in text:
        raise ValueError(f"{path}: not a YAML config (a binary file: it contains NUL bytes)")
    data = _yaml_load(text, str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a YAML mapping at the top level, got {show(data)}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ValueError(f"{path}: base: expected a config name or a relative path (a string), got {show(base)}")
    parent = _load_file(_locate(base, path.parent), (*chain, path))
    return _deep_merge(parent, data)


# --------------------------------------------------------------------------------------------- overrides

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.([A-Za-z_][A-Za-z0-9_]*|[0-9]+))*$")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=0.1"`` -> ``(["optim", "lr"], 0.1)``; the value is parsed as YAML (``[[a,b]]``, ``null``)."""
    if not isinstance(text, str) or "=" not in text:
        raise ValueError(
            f"malformed override {text!r}: expected dotted.key=value, e.g. optim.lr=0.1, "
            "train.cka_pairs=[[layer3,layer3]] or distiller.kwargs.alpha=3 (the value is read as YAML)"
        )
    key, _, raw = text.partition("=")
    key = key.strip()
    if not _KEY_RE.match(key):
        raise ValueError(
            f"malformed override {text!r}: the key {key!r} must be dotted names like optim.lr "
            "(list items by index: teachers.0.checkpoint)"
        )
    value = _yaml_load(raw, f"override {text!r}") if raw.strip() else None
    return key.split("."), value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of the raw config mapping with the dotted ``key=value`` overrides applied in order.

    Missing (or null) intermediate mappings are created; list items are addressed by index
    (``teachers.0.checkpoint=...``). Keys are not checked here but by :func:`config_from_dict`.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    out = copy.deepcopy(dict(data))
    for text in overrides:
        keys, value = parse_override(text)
        node: dict | list = out
        for i, k in enumerate(keys[:-1]):
            here = ".".join(keys[: i + 1])
            slot: Any = _list_index(node, k, here, text) if isinstance(node, list) else k
            nxt = node[slot] if isinstance(node, list) else node.get(slot)
            if nxt is None:
                nxt = node[slot] = {}
            if not isinstance(nxt, dict | list):
                raise ValueError(f"override {text!r}: '{here}' is {show(nxt)}, not a mapping; cannot set a key in it")
            node = nxt
        last = keys[-1]
        if isinstance(node, list):
            node[_list_index(node, last, ".".join(keys), text)] = value
        else:
            node[last] = value
    return out


def _list_index(node: list, k: str, here: str, text: str) -> int:
    if not k.isdigit() or int(k) >= len(node):
        raise ValueError(f"override {text!r}: '{here}' needs an index 0..{len(node) - 1} into the list")
    return int(k)


# --------------------------------------------------------------------------------------------- entry points


def load_raw_config(path_or_name: str | os.PathLike, overrides: Sequence[str] = ()) -> tuple[Path, dict[str, Any]]:
    """The file of a config reference and its mapping: ``base:`` chain merged underneath, ``overrides`` applied
    (not yet checked against a schema)."""
    path = _locate(os.fspath(path_or_name), None)
    data = _load_file(path, ())
    if not data:
        hint = _TASKS["classification"].empty_hint if "classification" in _TASKS else ""
        raise ValueError(
            f"{path}: the config has no keys (empty, or only comments): every setting would be a default{hint}; "
            "start from a shipped config (a first line `base: digits/kd`; `ckakd configs` lists them)"
        )
    if overrides:
        data = apply_overrides(data, overrides)
    return path, data


def load_config(path_or_name: str | os.PathLike, overrides: Sequence[str] = ()) -> Any:
    """Load a config: a YAML file path or a shipped name (``"digits/rcka"``), its ``base:`` chain merged
    underneath (child wins; mappings merged, lists replaced), then ``overrides`` (``"optim.lr=0.1"``); built into
    the schema of its ``task`` (:func:`config_from_dict`)."""
    _, data = load_raw_config(path_or_name, overrides)
    return config_from_dict(data)
