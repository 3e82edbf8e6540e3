"""The test-file harvest: the literal shapes of a kernel test file, each with the patch sizes, reduces, centers,
dtypes, ``need_*`` pairs and launcher keywords of its own test function (read with ``ast``)."""

from __future__ import annotations

import ast
import dataclasses
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REDUCES = ("channel", "batch", "spatial")
GRAM_LAUNCHERS = ("gram_forward", "gram_backward", "frobenius_dots")
PATCH_LAUNCHERS = ("patch_cka_forward", "patch_cka_backward")
# position of ph (pw follows) and of center in the launchers' positional arguments
_PATCH_ARG = {"patch_cka_forward": 2, "patch_cka_backward": 4}
_CENTER_ARG = {"gram_forward": 1, "gram_backward": 3, "patch_cka_forward": 5, "patch_cka_backward": 7}


@dataclasses.dataclass
class TestGroup:
    """The literals of one test function (with its decorators and the module-level constants it names).

    ``shapes``: int tuples by length -> for each, the ``(ph, pw)`` tuples and ``reduce`` strings written
    next to it (``((2, 3, 8, 12), (2, 4), 16)`` in a parametrize row, ``{16: ((1, 3, 8, 12), (2, 4))}``);
    ``patches``: the other ``(ph, pw)`` (loose int pairs, the patch arguments of ``patch_cka_*`` calls);
    ``ints`` / ``bools``: keyword or parametrize name -> values; ``centers``: ``center`` values (parametrized
    or literal launcher arguments); ``reduces``: reduce strings; ``needs``: parametrized ``(need_s, need_t)``
    pairs; ``low``: it uses fp16 / bf16 (``LOW``, ``torch.float16`` ...); ``launchers``: the launchers it calls.
    """

    name: str
    shapes: dict[int, dict[tuple[int, ...], tuple[set, set]]] = dataclasses.field(default_factory=dict)
    patches: set[tuple[int, int]] = dataclasses.field(default_factory=set)
    ints: dict[str, set[int]] = dataclasses.field(default_factory=dict)
    bools: dict[str, set[bool]] = dataclasses.field(default_factory=dict)
    centers: set[bool] = dataclasses.field(default_factory=set)
    reduces: set[str] = dataclasses.field(default_factory=set)
    needs: set[tuple[bool, bool]] = dataclasses.field(default_factory=set)
    low: bool = False
    launchers: set[str] = dataclasses.field(default_factory=set)

    def need_pairs(self) -> list[tuple[bool, bool]]:
        """(need_s, need_t) of the backward calls: both, and whatever the test passes."""
        need_s = self.bools.get("need_s", set()) | {True}
        need_t = self.bools.get("need_t", set()) | {True}
        pairs = set(itertools.product(need_s, need_t)) | self.needs
        return sorted((p for p in pairs if any(p)), reverse=True)

    def patch_items(self) -> Iterator[tuple[tuple[int, ...], tuple[int, int], tuple[str, ...]]]:
        """(shape, patch, reduces) of every 4-D shape of the group, paired as the test pairs them."""
        for shape, (near_patches, near_reduces) in sorted(self.shapes.get(4, {}).items()):
            reduces = near_reduces or self.reduces or set(REDUCES)
            for patch in sorted(near_patches or self.patches):
                yield shape, patch, tuple(r for r in REDUCES if r in reduces)


def _literal(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bool_pair(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, bool) for v in value)


def _int_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and bool(value) and all(_is_int(v) and v > 0 for v in value)


def _harvest(group: TestGroup, root: ast.AST, constants: dict[str, ast.AST]) -> TestGroup:
    def keyword(name: str, value: Any) -> None:
        if _is_int(value):
            group.ints.setdefault(name, set()).add(value)
        elif isinstance(value, bool):
            group.bools.setdefault(name, set()).add(value)
            if name == "center":
                group.centers.add(value)
        elif name.startswith("need") and _bool_pair(value):
            group.needs.add(value)

    near: set[int] = set()  # ids of int pairs written next to a shape
    loose: list[tuple[int, tuple[int, int]]] = []
    todo, seen = [root], set()
    while todo:
        top = todo.pop()
        for node in ast.walk(top):
            if isinstance(node, ast.Name) and node.id in constants and node.id not in seen:
                seen.add(node.id)
                todo.append(constants[node.id])
            if isinstance(node, ast.Name) and node.id in ("LOW", "LOW_DTYPES"):
                group.low = True
            elif isinstance(node, ast.Attribute) and node.attr in ("float16", "bfloat16", "half"):
                group.low = True
            elif isinstance(node, ast.Name) and node.id == "REDUCES":
                group.reduces |= set(REDUCES)
            elif isinstance(node, ast.Constant) and node.value in REDUCES:
                group.reduces.add(node.value)
            if isinstance(node, ast.Tuple) and _int_tuple(value := _literal(node)) and len(value) > 2:
                group.shapes.setdefault(len(value), {}).setdefault(value, (set(), set()))
            if isinstance(node, (ast.Tuple, ast.List)):
                values = [(el, _literal(el)) for el in node.elts]
                for el, value in values:
                    if _int_tuple(value) and len(value) > 2:
                        patches = {v for e, v in values if _int_tuple(v) and len(v) == 2 and not near.add(id(e))}
                        reduces = {v for _, v in values if isinstance(v, str) and v in REDUCES}
                        old = group.shapes.setdefault(len(value), {}).setdefault(value, (set(), set()))
                        old[0].update(patches)
                        old[1].update(reduces)
                    elif _int_tuple(value) and len(value) == 2:
                        loose.append((id(el), value))
            if not isinstance(node, ast.Call):
                continue
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if func in GRAM_LAUNCHERS + PATCH_LAUNCHERS:
                group.launchers.add(func)
            for kw in node.keywords:
                if kw.arg:
                    keyword(kw.arg, _literal(kw.value))
            for arg in node.args:
                if _int_tuple(value := _literal(arg)) and len(value) == 2:
                    loose.append((id(arg), value))
            positional = not any(isinstance(a, ast.Starred) for a in node.args)
            i = _PATCH_ARG.get(func)
            if positional and i is not None and len(node.args) > i + 1:
                ph, pw = _literal(node.args[i]), _literal(node.args[i + 1])
                if _is_int(ph) and _is_int(pw):
                    group.patches.add((ph, pw))
            i = _CENTER_ARG.get(func)
            if positional and i is not None and len(node.args) > i and isinstance(_literal(node.args[i]), bool):
                group.centers.add(_literal(node.args[i]))
            if func == "parametrize" and len(node.args) >= 2:
                names, values = _literal(node.args[0]), _literal(node.args[1])
                if isinstance(names, str) and isinstance(values, list):
                    names_list = [n.strip() for n in names.split(",")]
                    for row in values:
                        for name, value in zip(names_list, row if len(names_list) > 1 else (row,), strict=False):
                            keyword(name, value)
    group.patches |= {value for i, value in loose if i not in near}
    return group


def harvest_tests(path: Path) -> list[TestGroup]:
    """One :class:`TestGroup` per test function of a file that calls a kernel launcher, so that a shape goes
    with the patch sizes, reduces, centers, dtypes and launcher keywords of its own test."""
    tree = ast.parse(path.read_text())
    constants: dict[str, ast.AST] = {}
    funcs: list[ast.FunctionDef] = []
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    constants[target.id] = node.value
        elif isinstance(node, ast.FunctionDef):
            funcs.append(node)
        elif isinstance(node, ast.ClassDef):
            funcs += [n for n in node.body if isinstance(n, ast.FunctionDef)]
    groups = [_harvest(TestGroup(f.name), f, constants) for f in funcs]
    return [g for g in groups if g.launchers]
