"""What importing ckakd loads, and the shape of its import graph.

* ``import ckakd`` loads the loss core only: not the trainer, detection, diagnostics or the apps, and none of
  their optional dependencies (checked in a fresh interpreter; a module that ``import torch`` itself loads, as
  ``torch.hub`` does tqdm when it is installed, is not ckakd's doing and is not counted).
* No import cycle among ckakd's modules at module level (a static graph from ``ast``; an import inside a
  function is allowed: that is how the lazy paths are written).
* Every public name of the root resolves; ``__all__`` lists them all but the submodules.
* A command that needs a missing optional dependency says, in one line, which extra installs it.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ckakd"

NOT_CORE = ("ckakd.train", "ckakd.detection", "ckakd.diagnostics", "ckakd.apps")
HEAVY = ("matplotlib", "tqdm", "pycocotools", "yaml", "sklearn")

# dir(ckakd) (public part) in a fresh interpreter: the loss API and its modules. A change here is an API change.
ROOT_PUBLIC = [
    "InterrelationBuilder",
    "at_loss",
    "backends",
    "centered_gram",
    "cka",
    "cka_loss",
    "cost_from_interrelation",
    "dist_loss",
    "dkd_loss",
    "feature_kd",
    "fitnet_loss",
    "functional",
    "gaussian_wasserstein",
    "hsic",
    "interrelation",
    "interrelation_from_loader",
    "kd_loss",
    "lcka_loss",
    "load_interrelation",
    "logit_kd",
    "lskd_loss",
    "mmd_loss",
    "nn",
    "ops",
    "patch_cka",
    "patch_cka_loss",
    "rcka_loss",
    "reference",
    "save_interrelation",
    "sinkhorn",
    "standardize_logits",
    "wasserstein",
    "wkd",
    "wkd_feature_loss",
    "wkd_logit_loss",
]

_PROBE = textwrap.dedent(
    """
    import importlib, json, sys
    import torch  # the baseline: what torch loads by itself
    before = set(sys.modules)
    module = importlib.import_module(sys.argv[1])
    print(json.dumps({
        "ckakd": sorted(m for m in sys.modules if m == "ckakd" or m.startswith("ckakd.")),
        "new": sorted(set(sys.modules) - before),
        "dir": sorted(n for n in dir(sys.modules["ckakd"]) if not n.startswith("_")),
    }))
    """
)


def _fresh_import(module: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE, module], capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _under(names: list[str], prefixes: tuple[str, ...]) -> list[str]:
    return [n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)]


# ------------------------------------------------------------------------------------------- (a) import ckakd


def test_import_ckakd_loads_the_loss_core_only():
    loaded = _fresh_import("ckakd")
    assert not _under(loaded["ckakd"], NOT_CORE), loaded["ckakd"]
    assert not _under(loaded["new"], HEAVY), _under(loaded["new"], HEAVY)
    assert loaded["dir"] == ROOT_PUBLIC  # nothing appeared or vanished in a fresh interpreter


def test_cli_modules_load_no_trainer_or_detector_at_import():
    """``ckakd.apps.cli`` (imported by ``ckakd --help``) builds the parser of every command without the detection
    stack, the trainer's model zoo and config loader, or the optional dependencies; ``ckakd.ops.centered_gram`` adds
    nothing to the root's core."""
    cli = _fresh_import("ckakd.apps.cli")
    detection_stack = ("models", "task", "trainer", "runner", "distillers", "adapters", "config")
    assert not _under(cli["ckakd"], tuple(f"ckakd.detection.{m}" for m in detection_stack)), cli["ckakd"]
    assert not _under(cli["ckakd"], ("ckakd.train.runner", "ckakd.train.config")), cli["ckakd"]
    assert not _under(cli["new"], HEAVY), _under(cli["new"], HEAVY)
    assert _fresh_import("ckakd.ops.centered_gram")["ckakd"] == _fresh_import("ckakd")["ckakd"]


# ---------------------------------------------------------------------------------- (b) static import graph


def _module_files(package_dir: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is_package) for every ``.py`` of the package at ``package_dir``."""
    out: dict[str, tuple[Path, bool]] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_pkg)
    return out


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The imports that run when the module is imported: module level, including inside ``if`` / ``try`` /
    ``with`` blocks, but not inside functions, classes or ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            return
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    for statement in tree.body:
        visit(statement)
    return found


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the package's modules its module-level imports execute (absolute and relative imports;
    ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``)."""
    modules = _module_files(package_dir)
    root = package_dir.name

    def owner(name: str) -> str | None:  # the longest module prefix of a dotted name
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in modules.items():
        here = name if is_pkg else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in _top_level_imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            for target in targets:
                if target == root or target.startswith(root + "."):
                    resolved = owner(target)
                    if resolved is not None and resolved != name:
                        deps.add(resolved)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state:
                cycle = visit(dep)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle_in_ckakd():
    graph = import_graph(PACKAGE)
    # not vacuous: known edges are seen (absolute, relative and `from ckakd import module`)
    assert "ckakd.ops.centered_gram" in graph["ckakd.functional"] and "ckakd._checks" in graph["ckakd.functional"]
    assert "ckakd.train.hooks" in graph["ckakd.train"]
    assert "ckakd.apps.errors" in graph["ckakd.apps.cli"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _imported_names(path: Path, package: str) -> list[str]:
    """Every module ``path`` imports, at module level or inside a function, relative imports resolved."""
    parts = package.split(".")
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(parts[: len(parts) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            names.append(module)
            names += [f"{module}.{a.name}" for a in node.names]
    return names


def test_the_library_does_not_import_the_apps():
    """Nothing outside ``ckakd/apps`` imports ``ckakd.apps`` (not even inside a function): the applications sit on
    top of the library; ``ckakd/__main__.py`` (``python -m ckakd``) is their entry point."""
    offenders = []
    for name, (path, is_pkg) in _module_files(PACKAGE).items():
        if name == "ckakd.apps" or name.startswith("ckakd.apps.") or name == "ckakd.__main__":
            continue
        package = name if is_pkg else name.rpartition(".")[0]
        if any(n == "ckakd.apps" or n.startswith("ckakd.apps.") for n in _imported_names(path, package)):
            offenders.append(name)
    assert offenders == [], offenders
    # not vacuous: the entry point and the apps themselves are seen importing it
    assert "ckakd.apps.cli" in _imported_names(PACKAGE / "__main__.py", "ckakd")
    assert "ckakd.apps.errors" in _imported_names(PACKAGE / "apps" / "demo.py", "ckakd.apps")


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg import a\n")
    (pkg / "a.py").write_text("from .sub import b\n\ndef f():\n    from pkg import c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("import pkg.c\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.c"] == set()
    assert find_cycle(graph) is None
    (pkg / "c.py").write_text("try:\n    from . import a\nexcept ImportError:\n    a = None\n")
    assert find_cycle(import_graph(pkg)) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]


# ----------------------------------------------------------------------------------------- (c) public names


def test_every_public_name_of_the_root_resolves():
    import types

    import ckakd

    public = [n for n in dir(ckakd) if not n.startswith("_")]
    for name in dir(ckakd):
        getattr(ckakd, name)
    assert set(ROOT_PUBLIC) <= set(public)
    assert set(ckakd.__all__) <= set(ROOT_PUBLIC) and len(ckakd.__all__) == len(set(ckakd.__all__))
    rest = set(ROOT_PUBLIC) - set(ckakd.__all__)
    assert all(isinstance(getattr(ckakd, n), types.ModuleType) for n in rest), rest  # the submodules only
    for name in ckakd.__all__:
        assert name in dir(ckakd)


def test_the_rest_of_ckakd_is_reachable_from_the_root():
    import ckakd

    for name in ("train", "detection", "diagnostics", "apps", "kernels"):
        module = getattr(ckakd, name)
        assert module.__name__ == f"ckakd.{name}" and sys.modules[module.__name__] is module
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        ckakd.no_such_name  # noqa: B018


def test_detection_names_resolve_lazily():
    import ckakd.detection as det

    for name in det.__all__:
        value = getattr(det, name)
        assert getattr(sys.modules[f"ckakd.detection.{det._EXPORTS[name]}"], name) is value
        assert name in dir(det)
    assert det.trainer is sys.modules["ckakd.detection.trainer"]
    with pytest.raises(AttributeError):
        det.no_such_name  # noqa: B018


# ------------------------------------------------------------------------------ a missing optional dependency


def _setup_extras() -> dict[str, list[str]]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("ckakd_setup_extras", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() runs only as __main__
    return module.EXTRAS


def test_each_optional_dependency_names_an_extra_that_installs_it():
    from ckakd.apps.errors import EXTRAS, PIP_NAMES

    extras = _setup_extras()
    for module, extra in EXTRAS.items():
        pip_name = PIP_NAMES.get(module, module)
        assert any(r.split(">")[0].split("=")[0] == pip_name for r in extras[extra]), (module, extra)
        # the README's two commands install everything: [test] (pytest) and [demo] (ckakd demo); the logger
        # libraries are the exception: their tests inject fake tensorboard / wandb modules
        if module not in ("tensorboard", "wandb"):
            assert any(r.split(">")[0] == pip_name for r in extras["test"]), pip_name
    for pip_name in ("pyyaml", "tqdm", "matplotlib", "scikit-learn"):
        assert any(r.split(">")[0] == pip_name for r in extras["demo"]), pip_name


@pytest.mark.parametrize(
    "module", ["yaml", "tqdm.auto", "matplotlib.figure", "pycocotools.coco", "sklearn", "PIL", "tensorboard", "wandb"]
)
def test_cli_names_the_extra_of_a_missing_module(module, monkeypatch, capsys):
    from ckakd.apps import cli, errors

    def dispatch(args: argparse.Namespace, argv: list[str]) -> int:
        raise ModuleNotFoundError(f"No module named {module!r}", name=module)

    monkeypatch.setattr(cli, "dispatch", dispatch)
    assert cli.main(["configs"]) == 1
    err = capsys.readouterr().err
    extra = errors.EXTRAS[module.split(".")[0]]
    assert err.count("\n") == 1 and err.startswith("ckakd configs: error: ")
    assert f'pip install "ckakd[{extra}]"' in err, err


def test_cli_names_the_detection_extra_when_pycocotools_is_missing(monkeypatch, capsys):
    """The real import path: CocoEvaluator's import of pycocotools fails (ImportError raised from the
    ModuleNotFoundError)."""
    from ckakd.apps import cli
    from ckakd.detection import evaluation

    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    monkeypatch.setattr(cli, "run_detection_command", lambda args, argv: evaluation._import_pycocotools())
    assert cli.main(["detect-eval", "detection/retinanet_teacher", "--checkpoint", "x.pt"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pycocotools is not installed" in err and "ckakd[detection]" in err, err


def test_other_import_errors_are_not_hidden(monkeypatch):
    from ckakd.apps import cli

    def dispatch(args: argparse.Namespace, argv: list[str]) -> int:
        raise ModuleNotFoundError("No module named 'not_an_extra'", name="not_an_extra")

    monkeypatch.setattr(cli, "dispatch", dispatch)
    with pytest.raises(ModuleNotFoundError, match="not_an_extra"):
        cli.main(["configs"])


def test_missing_pyyaml_in_a_fresh_interpreter(tmp_path):
    """``ckakd configs`` and ``ckakd-demo`` without pyyaml (import yaml fails): one line naming [train]."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["yaml"] = None  # import yaml -> ModuleNotFoundError
        from ckakd.apps import cli, demo
        print("configs", cli.main(["configs"]), flush=True)
        print("demo", demo.main(["--methods", "ce", "--seeds", "1", "--epochs", "1", "--out", sys.argv[1]]), flush=True)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["configs", "1", "demo", "1"], proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith("ckakd configs: error: pyyaml is not installed") and "ckakd[train]" in lines[0]
    assert lines[1].startswith("ckakd demo: error: pyyaml is not installed") and "ckakd[train]" in lines[1]
    assert not (tmp_path / "demo").exists()


def test_setup_lists_every_package():
    """A non-editable install only ships the packages setup.py names: every ckakd folder with an __init__.py
    must be there (a package split into a folder and not listed would vanish from a wheel)."""
    import re

    root = Path(__file__).resolve().parents[1]
    text = (root / "setup.py").read_text()
    listed = set(ast.literal_eval(re.search(r"packages=(\[[^\]]*\])", text).group(1)))
    found = {
        ".".join(init.parent.relative_to(root).parts)
        for init in (root / "ckakd").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found - listed == set(), f"packages missing from setup.py: {sorted(found - listed)}"
