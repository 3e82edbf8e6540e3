"""State dicts from other codebases into ckakd's models: the weights inside a loaded file (:func:`find_state_dict`),
wrapper prefixes (:func:`strip_wrapper_prefixes`), ordered prefix rewrites (:func:`parse_key_map`,
:func:`apply_key_map`), the comparison with a model (:func:`compare_state_dict`, :class:`StateDictFit`) and the load
itself (:func:`load_external_state_dict`).

What torchvision, timm and most repositories ship is a plain ``state_dict`` (``torch.save(model.state_dict())``), or
one inside a dict (``{"model": ...}`` as mdistiller / DeiT / detectron2 write it, ``{"state_dict": ...}`` as timm's
training checkpoints and Lightning do). Names differ between codebases (``fc.`` vs ``classifier.``), DDP adds
``module.`` and ``torch.compile`` adds ``_orig_mod.``: the prefixes are stripped, then the key map rewrites prefixes
in order, then every key is compared with the model (missing, unexpected, shape mismatches) before anything loads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .schema import show

__all__ = [
    "STATE_DICT_KEYS",
    "WRAPPER_PREFIXES",
    "KeyMapError",
    "LoadReport",
    "StateDictFit",
    "apply_key_map",
    "compare_state_dict",
    "find_state_dict",
    "load_external_state_dict",
    "parse_key_map",
    "strip_wrapper_prefixes",
]

# The keys under which checkpoints of other codebases keep the weights, in the order they are looked for.
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "model_state", "net", "network", "module", "weights")
# Prefixes that wrappers add to every key: DDP / DataParallel (``module.``) and torch.compile (``_orig_mod.``).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 5  # keys named in a report, per kind


class KeyMapError(ValueError):
    """A key map that is malformed or that cannot apply to a state dict (a rule matching nothing, two keys
    renamed to the same one)."""


def _is_weights(obj: Any) -> bool:
    """A mapping of string keys to tensors (``_extra_state`` entries may hold anything)."""
    if not isinstance(obj, Mapping) or not obj:
        return False
    return all(isinstance(k, str) and (isinstance(v, Tensor) or k.endswith("_extra_state")) for k, v in obj.items())


def find_state_dict(obj: Any) -> tuple[dict[str, Any], str]:
    """The weights in a loaded checkpoint: ``obj`` itself when it is a plain state dict, else the first of
    :data:`STATE_DICT_KEYS` holding one (nested wrappers are followed: ``{"model": {"state_dict": ...}}``).

    Returns ``(state_dict, where)`` with ``where`` a description (``"a plain state dict"``, ``"the state dict
    under ['model']"``);
    raises ``ValueError`` listing the top-level keys when no state dict is found.
    """
    where: list[str] = []
    node = obj
    while not _is_weights(node):
        if not isinstance(node, Mapping):
            raise ValueError(
                f"holds a {type(node).__name__}, not a state dict (a mapping of parameter names to tensors)"
            )
        inner = next((k for k in STATE_DICT_KEYS if isinstance(node.get(k), Mapping) and node.get(k)), None)
        if inner is None:
            keys = [str(k) for k in list(node)[:12]]
            more = f" (+{len(node) - 12} more)" if len(node) > 12 else ""
            raise ValueError(
                f"has no state dict: neither the file itself nor any of {', '.join(repr(k) for k in STATE_DICT_KEYS)} "
                f"maps parameter names to tensors (top-level keys: {keys}{more})"
            )
        where.append(inner)
        node = node[inner]
    return dict(node), (
        "a plain state dict" if not where else "the state dict under " + "".join(f"[{k!r}]" for k in where)
    )


def strip_wrapper_prefixes(
    state: Mapping[str, Any], model_keys: Sequence[str] = ()
) -> tuple[dict[str, Any], list[str]]:
    """Drop the prefixes DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) put in front of every key, as long
    as every key has it and the model's own keys (``model_keys``) do not; ``_orig_mod.`` after a submodule's name
    (a compiled submodule: ``backbone._orig_mod.conv1.weight``) is dropped too. Returns ``(state, stripped)``."""
    out, stripped = dict(state), []
    own = list(model_keys)
    changed = True
    while changed and out:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in out) and not any(k.startswith(prefix) for k in own):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                stripped.append(prefix)
                changed = True
    if any("._orig_mod." in k for k in out) and not any("._orig_mod." in k for k in own):
        out = {k.replace("._orig_mod.", "."): v for k, v in out.items()}
        stripped.append("._orig_mod.")
    return out, stripped


def parse_key_map(value: Any, key: str = "key_map") -> list[tuple[str, str]]:
    """A key map as ordered ``(old prefix, new prefix)`` pairs, from a mapping (``{"fc.": "classifier."}``, in
    its order) or a list of pairs (``[["fc.", "classifier."]]``); ``None`` is no rules. ``KeyMapError`` names
    ``key`` on anything else."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, list | tuple):
        pairs = []
        for i, item in enumerate(value):
            if not isinstance(item, list | tuple) or len(item) != 2:
                raise KeyMapError(f"{key}[{i}]: expected an [old prefix, new prefix] pair, got {show(item)}")
            pairs.append((item[0], item[1]))
    else:
        raise KeyMapError(
            f"{key}: expected a mapping of prefixes ({{'fc.': 'classifier.'}}) or a list of [old, new] pairs, "
            f"got {show(value)}"
        )
    for i, (old, new) in enumerate(pairs):
        if not isinstance(old, str) or not isinstance(new, str):
            raise KeyMapError(
                f"{key}[{i}]: prefixes must be strings (quote them in YAML), got {show(old)} -> {show(new)}"
            )
        if old == new:
            raise KeyMapError(f"{key}[{i}]: {old!r} -> {new!r} renames nothing; drop it")
    return [(str(o), str(n)) for o, n in pairs]


def apply_key_map(state: Mapping[str, Any], rules: Sequence[tuple[str, str]]) -> tuple[dict[str, Any], list[str]]:
    """Rewrite key prefixes: each rule ``(old, new)`` in order, on the keys as the earlier rules left them, turns
    every key starting with ``old`` into ``new + rest`` (``old=""`` prefixes every key). Returns ``(state,
    unused)``: ``unused`` describes the rules that matched no key. ``KeyMapError`` when two keys would get the same
    name."""
    out, unused = dict(state), []
    for old, new in rules:
        renamed: dict[str, Any] = {}
        hits = 0
        for k, v in out.items():
            if k.startswith(old):
                k, hits = new + k[len(old) :], hits + 1
            if k in renamed:
                raise KeyMapError(f"key_map rule {old!r} -> {new!r} gives two tensors the name {k!r}")
            renamed[k] = v
        if not hits:
            unused.append(f"{old!r} -> {new!r}")
        out = renamed
    return out, unused


def _listing(items: Sequence[str]) -> str:
    more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return f"{list(items[:_SHOW])}{more}"


@dataclass
class StateDictFit:
    """How a state dict fits a model: the keys the model has and the state dict lacks (``missing``), the keys only
    the state dict has (``unexpected``), and ``"key: checkpoint (shape) vs model (shape)"`` entries
    (``mismatched``); ``matched`` tensors fit."""

    matched: int
    total: int  # entries of the model's state dict
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every key of the model is there with its shape, and nothing else is."""
        return not (self.missing or self.unexpected or self.mismatched)

    def problems(self) -> str:
        """``"2 missing keys: [...]; 1 unexpected keys: [...]"`` (the first five of each kind and the counts)."""
        parts = []
        for label, items in (
            ("missing keys", self.missing),
            ("unexpected keys", self.unexpected),
            ("shape mismatches", self.mismatched),
        ):
            if items:
                parts.append(f"{len(items)} {label}: {_listing(items)}")
        return "; ".join(parts)


def compare_state_dict(model: nn.Module, state: Mapping[str, Any]) -> StateDictFit:
    """Compare ``state`` with ``model.state_dict()`` key by key (shapes of tensors too)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and isinstance(state[k], Tensor) and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    matched = sum(1 for k in own if k in state) - len(mismatched)
    return StateDictFit(matched, len(own), missing, unexpected, mismatched)


@dataclass
class LoadReport:
    """What :func:`load_external_state_dict` did: where the weights were found in the file, the wrapper prefixes
    it stripped, the key-map rules it applied and those that matched nothing, and the :class:`StateDictFit`."""

    source: str
    stripped: list[str]
    rules: list[tuple[str, str]]
    unused_rules: list[str]
    fit: StateDictFit
    strict: bool

    def text(self) -> str:
        """One line: ``"loaded 62/62 tensors from a plain state dict (stripped 'module.'; key_map 'fc.' ->
        'classifier.')"``, then the problems of a non-strict load."""
        how = []
        if self.stripped:
            how.append("stripped " + ", ".join(repr(p) for p in self.stripped))
        if self.rules:
            how.append("key_map " + ", ".join(f"{o!r} -> {n!r}" for o, n in self.rules))
        if self.unused_rules:
            how.append("unused key_map rules " + ", ".join(self.unused_rules))
        detail = f" ({'; '.join(how)})" if how else ""
        line = f"loaded {self.fit.matched}/{self.fit.total} tensors from {self.source}{detail}"
        if not self.fit.ok:
            line += f"; not loaded (strict=false): {self.fit.problems()}"
        return line


def load_external_state_dict(
    model: nn.Module,
    obj: Any,
    *,
    key_map: Any = None,
    strict: bool = True,
    what: str = "",
) -> LoadReport:
    """Load the weights in ``obj`` (a loaded file: a plain state dict or one of its wrappers, see
    :func:`find_state_dict`) into ``model``: wrapper prefixes stripped, ``key_map`` (see :func:`parse_key_map`)
    applied, every key checked.

    ``strict=True`` (the default) loads only a state dict that fits exactly and raises ``ValueError`` naming the
    missing and unexpected keys and the shape mismatches (and key-map rules that matched nothing) otherwise;
    ``strict=False`` loads the tensors that fit (same name and shape) and reports the rest. ``what`` (e.g. the
    file) starts the error messages. Returns the :class:`LoadReport`.
    """
    rules = parse_key_map(key_map)
    state, source = find_state_dict(obj)
    own = model.state_dict()
    state, stripped = strip_wrapper_prefixes(state, list(own))
    state, unused = apply_key_map(state, rules)
    fit = compare_state_dict(model, state)
    if strict and (not fit.ok or unused):
        problems = [p for p in (fit.problems(),) if p]
        if unused:
            problems.append(f"key_map rules that matched no key: {', '.join(unused)}")
        keys = _listing(list(state))
        hint = (
            "; map the names with key_map (ordered prefix rewrites, e.g. {'fc.': 'classifier.'}) or load the tensors "
            "that fit with strict=false"
        )
        start = f"{what}: " if what else ""
        raise ValueError(
            f"{start}the weights ({source}) do not fit {type(model).__name__}: {'; '.join(problems)} (their keys "
            f"after renaming: {keys}){hint}"
        )
    bad = {entry.split(":", 1)[0] for entry in fit.mismatched}
    model.load_state_dict({k: v for k, v in state.items() if k in own and k not in bad}, strict=strict)
    return LoadReport(source, stripped, rules, unused, fit, strict)
