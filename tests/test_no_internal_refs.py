"""The tracked sources, configs and docs cite papers by authors, venue and table / section, never the internal
planning notes or their numbering of the papers. Fails listing ``file:line`` of every hit."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = (".py", ".yaml", ".md", ".sh", ".cpp", ".cu", ".h")
# Assembled from pieces so that this file does not match itself.
_D, _S = "DESIGN", "seed"
PATTERNS = [
    re.escape(_D + ".md"),
    re.escape(_D + " §"),
    re.escape(_S + " 00"),
    re.escape(_S + " Table"),
    re.escape(_S + " §"),
    re.escape(_S + " appendix"),
]
PATTERN = re.compile("|".join(PATTERNS))


def _tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no tracked-file list")
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], check=True, capture_output=True).stdout.decode(
        "utf-8", "surrogateescape"
    )
    return [ROOT / name for name in out.split("\0") if name.endswith(SUFFIXES)]


def test_no_internal_references() -> None:
    hits = []
    for path in _tracked_files():
        if not path.is_file():  # deleted in the work tree, not yet committed
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if PATTERN.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "references to internal planning notes / seed numbering:\n" + "\n".join(hits)
