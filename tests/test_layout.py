"""The house rules of the package layout, checked statically over every module of ``ckakd``.

* No private name crosses modules: ``from ckakd.x import _name`` is allowed only where ``_name`` is itself a
  package-private module (``ckakd._checks``, ``ckakd.ops._backend``); a private function that another module
  needs is made public in its owner or moved.
* An import inside a function is allowed only for a heavy optional dependency (matplotlib, tqdm, torchvision,
  ...), or at one of the few lazy boundaries listed below, each with its reason.
* No module is over ``MAX_LINES`` lines unless it holds one kind of thing (listed below, with what that is).
* Tests mirror the package: every test file lives in the folder of the layer it tests.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ckakd"
MAX_LINES = 500

# Function-local imports of these (or their submodules) are what keeps them optional or `import ckakd` light.
OPTIONAL = (
    "matplotlib",
    "tqdm",
    "yaml",
    "pycocotools",
    "sklearn",
    "torchvision",
    "timm",
    "safetensors",
    "tensorboard",
    "torch.utils.tensorboard",
    "triton",
    "PIL",
    "torch.distributed",
    "torch.nn.parallel",
    "wandb",
    "torch.utils.cpp_extension",  # setuptools and the compiler toolchain: only for a JIT build of ckakd._C
    "ckakd._C",  # the compiled extension, optional: loaded by ckakd._ext when present
    "ckakd.kernels",  # the Triton kernels (import triton): loaded on the first Triton launch
)

# (importing module or package prefix, imported module) -> why the import is made inside a function.
_YAML = "the config loader needs pyyaml (the [train] extra): a missing one is reported by the app, not at import"
_DETECTION = "the detection stack loads for detection commands only, not for `ckakd --help` or classification"
LAZY_BOUNDARIES: dict[tuple[str, str], str] = {
    ("ckakd.apps.cli", "ckakd.detection.config"): _DETECTION,
    ("ckakd.apps.cli", "ckakd.detection.runner"): _DETECTION,
    ("ckakd.apps.cli", "ckakd.train.config"): _YAML,
    ("ckakd.apps.cli", "ckakd.train.runner"): _YAML,
    ("ckakd.apps.demo", "ckakd.train.config"): _YAML,
    ("ckakd.apps.demo", "ckakd.train.runner"): _YAML,
    ("ckakd.apps.study", "ckakd.train.config"): _YAML,
    ("ckakd.apps.study", "ckakd.train.runner"): _YAML,
    ("ckakd.apps.detect_demo", "ckakd.detection.data"): _DETECTION,
    ("ckakd.apps.detect_demo", "ckakd.detection.distillers"): _DETECTION,
    ("ckakd.apps.detect_demo", "ckakd.detection.models"): _DETECTION,
    ("ckakd.apps.detect_demo", "ckakd.detection.trainer"): _DETECTION,
    ("ckakd.apps.detect_demo", "ckakd.detection.visualize"): _DETECTION,
    ("ckakd.apps.selftest.bench", "run_all"): "bench/run_all.py of the checkout, on sys.path only while it runs",
}

# module -> the one kind of thing it holds, for modules over MAX_LINES.
ONE_KIND: dict[str, str] = {
    "ckakd.functional": "the public CKA-family losses (CKA, HSIC, RCKA, LCKA, patch CKA, MMD) and their checks",
    "ckakd.detection.adapters": "the adapters of torchvision / timm detectors to the distillers' protocol",
}


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_module(dotted: str) -> bool:
    rel = Path(*dotted.split("."))
    if (REPO / rel).with_suffix(".py").is_file() or (REPO / rel / "__init__.py").is_file():
        return True
    return any((REPO / rel.parent).glob(f"{rel.name}.*.so")) or any((REPO / rel.parent).glob(f"{rel.name}.*.pyd"))


def _function_imports(tree: ast.AST):
    """(node, imported module names) for every import inside a function body."""
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    yield node, [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    yield node, None


def _from_targets(module: str, path: Path, node: ast.ImportFrom) -> list[str]:
    """``from a import b, c``: ``a.b`` / ``a.c`` (for ckakd: where those are modules, else ``a``)."""
    source = _absolute(module, path, node)
    if source != "ckakd" and not source.startswith("ckakd."):
        return sorted(f"{source}.{a.name}" for a in node.names)
    return sorted({f"{source}.{a.name}" if _is_module(f"{source}.{a.name}") else source for a in node.names})


def _optional(name: str) -> bool:
    return any(name == o or name.startswith(o + ".") for o in OPTIONAL)


def test_no_private_name_crosses_modules():
    bad = []
    for module, path in _modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            source = _absolute(module, path, node)
            if source != "ckakd" and not source.startswith("ckakd."):
                continue
            for alias in node.names:
                name = alias.name
                if name.startswith("_") and not name.startswith("__") and not _is_module(f"{source}.{name}"):
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno}: from {source} import {name}")
    assert not bad, "private names imported across modules (make them public in their owner):\n" + "\n".join(bad)


def test_function_local_imports_only_for_optional_dependencies():
    bad, seen = [], set()
    for module, path in _modules():
        for node, names in _function_imports(ast.parse(path.read_text(), str(path))):
            targets = names if names is not None else _from_targets(module, path, node)
            for target in targets:
                if _optional(target):
                    continue
                if (module, target) in LAZY_BOUNDARIES:
                    seen.add((module, target))
                    continue
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}: import of {target} inside a function")
    assert not bad, "function-local imports that break no optional dependency:\n" + "\n".join(bad)
    stale = set(LAZY_BOUNDARIES) - seen
    assert not stale, f"LAZY_BOUNDARIES entries no longer in the code: {sorted(stale)}"


def test_no_module_mixes_jobs_past_the_size_limit():
    sizes = {module: len(path.read_text().splitlines()) for module, path in _modules()}
    over = sorted(f"{m} ({n} lines)" for m, n in sizes.items() if n > MAX_LINES and m not in ONE_KIND)
    assert not over, f"modules over {MAX_LINES} lines that are not one kind of thing: {over}"
    stale = sorted(m for m in ONE_KIND if sizes.get(m, 0) <= MAX_LINES)
    assert not stale, f"ONE_KIND entries that are no longer over the limit (drop them): {stale}"


def test_bench_scripts_and_their_modules_stay_under_the_size_limit():
    """bench/ follows the same rule: scripts split by job into bench/harness/, kernel_report/, gpu_suite/, and no
    private name imported from another of its modules."""
    paths = sorted((REPO / "bench").rglob("*.py"))
    assert len(paths) > 10, "bench/ scripts not found"
    over = [f"{p.relative_to(REPO)} ({n} lines)" for p in paths if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not over, f"bench modules over {MAX_LINES} lines: {over}"
    private = [
        f"{p.relative_to(REPO)}: from {node.module} import {alias.name}"
        for p in paths
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.ImportFrom)
        and node.module
        and node.module.split(".")[0] in {"harness", "kernel_report", "gpu_suite"}
        for alias in node.names
        if alias.name.startswith("_")
    ]
    assert not private, f"private names imported across bench modules: {private}"


TEST_FOLDERS = {"ops", "losses", "train", "detection", "diagnostics", "apps"}
PROJECT_TESTS = {
    "test_imports.py",
    "test_layout.py",
    "test_readme.py",
    "test_no_internal_refs.py",
    "test_compile_report.py",
    "test_gpu_validate.py",
}


def test_tests_mirror_the_package():
    tests = REPO / "tests"
    loose = sorted(p.name for p in tests.glob("test_*.py") if p.name not in PROJECT_TESTS)
    assert not loose, f"tests at tests/ root that belong in a layer folder ({sorted(TEST_FOLDERS)}): {loose}"
    folders = {p.parent.name for p in tests.rglob("test_*.py") if p.parent != tests}
    assert folders <= TEST_FOLDERS, f"test folders that mirror no layer: {sorted(folders - TEST_FOLDERS)}"
    for folder in folders:
        assert (tests / folder / "__init__.py").is_file(), f"tests/{folder}/__init__.py missing"


@pytest.mark.parametrize(
    "source, expect_bad",
    [
        ("def f():\n    import os\n", True),
        ("def f():\n    import matplotlib.pyplot as plt\n", False),
        ("import os\n", False),
        ("def f():\n    from torchvision.ops import nms\n", False),
    ],
)
def test_function_import_detector_sees_what_it_should(source, expect_bad):
    found = [t for node, names in _function_imports(ast.parse(source)) for t in (names or [node.module])]
    assert any(not _optional(t) for t in found) is expect_bad
