"""The package's shape (docs/architecture.md): its import layers, no import cycle, one home for every
exception, and no object's attributes set from outside it."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import capstream

PACKAGE = Path(capstream.__file__).resolve().parent
REPO = PACKAGE.parents[1]

# Attributes capstream sets on other libraries' objects, each through that library's documented
# configuration object (patches of private code live in capstream/patches/, which is not scanned).
FOREIGN_SETTINGS = {
    ("backends/ray.py", "context.execution_options.preserve_order"),  # ray.data.DataContext, as Ray documents it
    ("backends/ray.py", "context.enable_progress_bars"),
    ("io/source.py", "builder.config.decode_num_threads"),  # the folder builder's own config, for this stream
}


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages([str(PACKAGE)], prefix="capstream."))


def test_the_import_contracts_hold():
    """The layers and the forbidden imports of pyproject.toml's [tool.importlinter] (lint-imports)."""
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint, "import-linter is in the test extra"
    result = subprocess.run([lint, "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


def test_a_broken_layer_is_caught(tmp_path):
    """The contract can fail: a row module importing the run core breaks it."""
    copy = tmp_path / "src"
    shutil.copytree(PACKAGE, copy / "capstream")
    with open(copy / "capstream" / "row" / "results.py", "a") as f:
        f.write("\nfrom ..core import run as _reaching_up  # noqa\n")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    result = subprocess.run([lint, "--no-cache"], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(copy), "PATH": str(Path(sys.executable).parent)})
    assert result.returncode == 1 and "BROKEN" in result.stdout, result.stdout[-2000:]


def test_no_import_cycles():
    """No module imports itself through others (type-checking imports aside)."""
    import grimp

    graph = grimp.build_graph("capstream", exclude_type_checking_imports=True, cache_dir=None)
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    cycles = _strongly_connected(edges)
    assert not cycles, cycles


def _strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm: the groups of more than one module that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(group)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in edges:
        if node not in index:
            visit(node)
    return found


OPTIONAL = {"ray", "matplotlib", "playwright", "tiktoken"}  # the extras' packages: their modules are read without them


def test_every_exception_class_is_defined_in_errors():
    homes = set()
    for name in _modules():
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if (err.name or "").split(".")[0] not in OPTIONAL:
                raise
            _no_exception_class_in_source(name)
            continue
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("capstream"):
                homes.add((obj.__module__, obj.__name__))
    assert {module for module, _ in homes} == {"capstream.errors"}, sorted(homes)


def _no_exception_class_in_source(name: str) -> None:
    """A module that needs an extra not installed here: no class of it derives from an exception
    class by name (what can be said without importing it)."""
    path = PACKAGE.joinpath(*name.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            bases = {ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases}
            assert not any(b.endswith(("Error", "Exception")) for b in bases), (name, node.name)


def test_no_attribute_is_set_from_outside_its_object():
    """``x.attr = ...`` only with ``x`` being ``self`` (or ``cls``): collaborators come through
    constructors, records change through their own methods."""
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith(("patches/", "testing/")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            for target in targets:
                for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                    if isinstance(t, ast.Attribute) and not (isinstance(t.value, ast.Name) and t.value.id in ("self", "cls")):
                        found.add((relative, ast.unparse(t)))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr":
                found.add((relative, ast.unparse(node)))
    assert found == FOREIGN_SETTINGS, sorted(found - FOREIGN_SETTINGS)


@pytest.mark.parametrize("name", ["capstream.model.processes", "capstream.model.call"])
def test_a_worker_process_imports_only_the_model_call(name):
    """What ``python -m capstream.model.processes`` loads of capstream: the model layer and what it rests on."""
    code = f"import sys, {name}; print(sorted(m for m in sys.modules if m.startswith('capstream')))"
    loaded = eval(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    allowed = ("capstream.model", "capstream.errors", "capstream.patches")
    assert all(m == "capstream" or m.startswith(allowed) for m in loaded), loaded
