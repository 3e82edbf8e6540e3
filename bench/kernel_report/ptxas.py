"""Resource usage from ``ptxas -v`` / ``nvcc -Xptxas -v`` and ``cuobjdump --dump-resource-usage`` output, and
C++ kernel names (demangled, split into the kernel and its template arguments)."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from collections.abc import Sequence


@dataclasses.dataclass
class Usage:
    """Resource usage of one compiled function."""

    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack_bytes: int = 0
    shared_bytes: int = 0


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_PROPS = re.compile(r"Function properties for (\S+)")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str) -> dict[str, Usage]:
    """Per-entry-function usage from ``ptxas -v`` output (also as printed by ``nvcc -Xptxas -v``).

    Device functions that only get a "Function properties" block (no "Used N registers") are left out.
    """
    props: dict[str, tuple[int, int, int]] = {}
    out: dict[str, Usage] = {}
    entry = None
    last_props = None
    for line in text.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            entry = m.group(1)
        elif m := _PTXAS_PROPS.search(line):
            last_props = m.group(1)
        elif (m := _PTXAS_STACK.search(line)) and last_props is not None:
            props[last_props] = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
        elif (m := _PTXAS_USED.search(line)) and entry is not None:
            stack, stores, loads = props.get(entry, (0, 0, 0))
            smem = _PTXAS_SMEM.search(line)
            out[entry] = Usage(int(m.group(1)), stores, loads, stack, int(smem.group(1)) if smem else 0)
    return out


_CUOBJ_FUNC = re.compile(r"^\s*Function (\S+?):\s*$")
_CUOBJ_FIELD = re.compile(r"(\w+(?:\[\d+\])?):(\d+)")


def parse_cuobjdump(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump --dump-resource-usage`` -> {function: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}}."""
    out: dict[str, dict[str, int]] = {}
    func = None
    for line in text.splitlines():
        if m := _CUOBJ_FUNC.match(line):
            func = m.group(1)
        elif func is not None and "REG:" in line:
            out[func] = {k: int(v) for k, v in _CUOBJ_FIELD.findall(line)}
            func = None
    return out


def split_demangled(name: str) -> tuple[str, str]:
    """``void ns::kern<float, 4>(float const*, int)`` -> (``kern``, ``float, 4``); other names unchanged."""
    depth = 0
    cut = len(name)
    for i, ch in enumerate(name):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not name.startswith("(anonymous namespace)", i):
            cut = i
            break
    head = name[:cut].strip()
    if head.startswith("void "):
        head = head[len("void ") :]
    config = ""
    if head.endswith(">"):
        depth = 0
        for i in range(len(head) - 1, -1, -1):
            depth += {">": 1, "<": -1}.get(head[i], 0)
            if depth == 0:
                config = head[i + 1 : -1].strip()
                head = head[:i]
                break
    return head.split("::")[-1], config


def demangle(names: Sequence[str]) -> list[str]:
    """Demangle C++ symbol names with ``c++filt`` (unchanged when it is not installed)."""
    tool = shutil.which("c++filt")
    if not tool or not names:
        return list(names)
    res = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True, check=False)
    lines = res.stdout.splitlines()
    return lines if res.returncode == 0 and len(lines) == len(names) else list(names)
