"""The house rules of docs/ARCHITECTURE.md, checked on the source (each checker also on a planted
violation, so that a rule that could never fire is caught too):

- imports point down the layers: dali_pipelines imports no simmatch; methods and models import
  nothing of the engine; the engine imports no export (simmatch.weights.export);
- run/ and config/ (and the method facts, files/atomic.py, checkpoint/elastic.py) import no
  torch at import time, directly or through the modules they import;
- no private name crosses a module: no `from x import _name`, no `module._name`, and no
  `obj._name` of a private that another file of the project defines;
- at most 6 modules directly in simmatch/ besides __init__.py, and no source file of 450 lines
  or more;
- no import cycles: neither between files nor between folders (a folder of simmatch/ with its
  subfolders is one layer; an import inside a function counts too).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PROJECT = ("simmatch", "slurm", "dali_pipelines")
CODE_DIRS = ("simmatch", "slurm", "dali_pipelines", "tools", "benchmarks")
TORCH_FREE = ("simmatch/config", "simmatch/run", "simmatch/files", "simmatch/fields.py", "simmatch/images",
              "simmatch/archives",
              "simmatch/shards", "simmatch/methods/__init__.py", "simmatch/methods/card.py",
              "simmatch/methods/*/__init__.py", "simmatch/checkpoint/elastic.py", "simmatch/checks.py",
              "simmatch/launch/preflight.py", "simmatch/launch/recipe.py")
HEAVY = ("torch", "torchvision", "nvidia")
MAX_LINES = 450
MAX_TOP_MODULES = 6


def sources(root: Path, dirs=CODE_DIRS) -> list[Path]:
    return sorted(p for d in dirs for p in (root / d).rglob("*.py"))


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(root: Path, name: str) -> Path | None:
    """The file of module `name` under `root` (a package's __init__.py), or None (third party)."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports(path: Path, top_level_only: bool = False) -> list[tuple[str, list[str]]]:
    """(module, names imported from it) of every absolute import in `path`; with `top_level_only`
    only those that run when the module is imported (not inside functions)."""
    found: list[tuple[str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if top_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, []) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module, [alias.name for alias in child.names]))
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def import_time_closure(root: Path, start: Path) -> set[str]:
    """Every module (project or not) that importing `start` imports, following project modules."""
    seen_files: set[Path] = set()
    modules: set[str] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen_files:
            continue
        seen_files.add(path)
        for module, names in imports(path, top_level_only=True):
            candidates = [module] + [f"{module}.{n}" for n in names]
            for name in candidates:
                parts = name.split(".")
                for i in range(1, len(parts) + 1):  # a package's __init__ runs before its submodule
                    prefix = ".".join(parts[:i])
                    file = _resolve(root, prefix)
                    if file is not None:
                        todo.append(file)
                    elif i == 1 or prefix == module:
                        modules.add(prefix)
            modules.add(module)
    return modules


def torch_at_import(root: Path, paths: list[Path]) -> list[str]:
    bad = []
    for path in paths:
        heavy = sorted(m for m in import_time_closure(root, path) if m.split(".")[0] in HEAVY)
        if heavy:
            bad.append(f"{path.relative_to(root)} imports {heavy[0]} at import time")
    return bad


def imports_of(root: Path, package: str, forbidden: tuple[str, ...], top_level_only: bool = False) -> list[str]:
    """`package`'s files that import a module starting with one of `forbidden`."""
    return [f"{path.relative_to(root)} imports {module}"
            for path in sorted((root / package).rglob("*.py"))
            for module, names in imports(path, top_level_only)
            if any(name.startswith(forbidden) for name in [module] + [f"{module}.{n}" for n in names])]


def private_definitions(path: Path) -> set[str]:
    """Private methods, functions and attributes (`self._x = ...`) that `path` defines."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def private_crossings(root: Path, files: list[Path], object_access: bool = True) -> list[str]:
    """Private names used outside the file that defines them (see the module docstring)."""
    defined = {path: private_definitions(path) for path in sources(root)}
    project_privates = set().union(*defined.values()) if defined else set()
    bad = []
    for path in files:
        tree = ast.parse(path.read_text())
        own = private_definitions(path)
        modules: set[str] = set()  # local names bound to project modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.split(".")[0] in PROJECT + ("conftest",):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        bad.append(f"{path.relative_to(root)}:{node.lineno} imports {node.module}.{alias.name}")
                    if _resolve(root, f"{node.module}.{alias.name}") is not None:
                        modules.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in PROJECT:
                        modules.add(alias.asname or alias.name.split(".")[0])
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
                continue
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super":
                continue
            if isinstance(base, ast.Name) and base.id in modules:
                bad.append(f"{path.relative_to(root)}:{node.lineno} uses {base.id}.{node.attr}")
            elif object_access and node.attr in project_privates and node.attr not in own:
                bad.append(f"{path.relative_to(root)}:{node.lineno} uses .{node.attr}, private to another module")
    return bad


def import_graph(root: Path, files: list[Path]) -> dict[Path, set[Path]]:
    """file -> the project files it imports (anywhere in it, a package's __init__ for a package)."""
    graph: dict[Path, set[Path]] = {}
    for path in files:
        targets = set()
        for module, names in imports(path):
            for name in [f"{module}.{n}" for n in names] + [module]:
                target = _resolve(root, name)
                if target is not None:
                    targets.add(target)
                    break
        graph[path] = targets - {path}
    return graph


def _layer(root: Path, path: Path) -> str:
    """A file's layer: its folder under simmatch/ (subfolders included), or the file itself."""
    parts = path.relative_to(root).parts
    return "/".join(parts[:2]) if len(parts) > 2 else "/".join(parts)


def cycles(graph: dict) -> list[list]:
    """The strongly connected groups of more than one node (Tarjan), each sorted."""
    index: dict = {}
    low: dict = {}
    stack: list = []
    on: set = set()
    found: list[list] = []

    def visit(v) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(map(str, group)))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def import_cycles(root: Path, files: list[Path]) -> list[str]:
    """Every cycle of imports between files, and between folders (layers), as one line each."""
    graph = import_graph(root, files)
    file_cycles = cycles({a: bs for a, bs in graph.items()})
    layers: dict[str, set[str]] = {}
    for a, bs in graph.items():
        layers.setdefault(_layer(root, a), set()).update(_layer(root, b) for b in bs)
    layer_cycles = cycles({a: bs - {a} for a, bs in layers.items()})
    return ([f"files import each other: {' -> '.join(str(Path(c).relative_to(root)) for c in cycle)}"
             for cycle in file_cycles] + [f"folders import each other: {', '.join(cycle)}" for cycle in layer_cycles])


def oversized(root: Path, paths: list[Path]) -> list[str]:
    return [f"{p.relative_to(root)}: {n} lines" for p in paths if (n := len(p.read_text().splitlines())) >= MAX_LINES]


# --------------------------------------------------------------------------- the rules, on the project


def test_dali_pipelines_import_no_simmatch():
    assert not imports_of(ROOT, "dali_pipelines", ("simmatch",))


@pytest.mark.parametrize("package", ["simmatch/methods", "simmatch/models"])
def test_methods_and_models_do_not_import_the_engine(package):
    """The engine drives the methods; a method needs nothing from it (the phase timer lives
    in simmatch/timing.py)."""
    assert not imports_of(ROOT, package, ("simmatch.engine",))


def test_the_engine_imports_no_export():
    """Training never needs the export code (engine/offline.py reads networks through
    weights/networks.py); the export builds on what training wrote."""
    assert not imports_of(ROOT, "simmatch/engine", ("simmatch.weights.export",))


def test_run_and_config_import_no_torch():
    paths = [p for entry in TORCH_FREE for p in (sorted(ROOT.glob(entry)) if entry.endswith(".py")
                                                 else sorted((ROOT / entry).rglob("*.py")))]
    assert len(paths) > 30
    assert not torch_at_import(ROOT, paths)


def test_no_import_cycles_between_files_or_folders():
    assert not import_cycles(ROOT, sources(ROOT, ("simmatch", "slurm", "dali_pipelines")))


def test_no_private_name_crosses_a_module():
    assert not private_crossings(ROOT, sources(ROOT))
    # tests may look inside objects, but import no private name of the project
    assert not private_crossings(ROOT, sources(ROOT, ("tests",)), object_access=False)


def test_the_house_stays_small():
    top = sorted(p.name for p in (ROOT / "simmatch").glob("*.py") if p.name != "__init__.py")
    assert len(top) <= MAX_TOP_MODULES, top
    assert not oversized(ROOT, sources(ROOT, CODE_DIRS + ("tests",)))


@pytest.mark.slow
def test_light_modules_really_import_no_torch():
    """The same rule, measured: a fresh interpreter that imports them has no torch loaded."""
    names = ["simmatch.config", "simmatch.launch.preflight", "simmatch.launch.recipe", "simmatch.run.world_sizes",
             "simmatch.run.lock", "simmatch.run.change", "simmatch.checkpoint.elastic", "simmatch.methods"]
    code = (f"import sys\nfor n in {names!r}: __import__(n)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- each checker fires


def _plant(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_each_checker_finds_a_planted_violation(tmp_path):
    _plant(tmp_path, {
        "simmatch/__init__.py": "",
        "simmatch/run/__init__.py": "",
        "simmatch/run/light.py": "from simmatch.heavy import thing\n",
        "simmatch/run/lazy.py": "def f():\n    import torch\n",  # inside a function: allowed
        "simmatch/heavy.py": "import torch\n\ndef thing():\n    pass\n\ndef _hidden():\n    pass\n",
        "simmatch/engine/__init__.py": "",
        "simmatch/engine/loop.py": "def go(t):\n    from simmatch.weights.export import export\n    t._step()\n",
        "simmatch/weights/__init__.py": "",
        "simmatch/weights/export.py": "def export():\n    pass\n",
        "simmatch/trainer.py": "class T:\n    def _step(self):\n        return self._step\n",
        "slurm/__init__.py": "",
        "slurm/job.py": "from simmatch.heavy import _hidden\nfrom simmatch import heavy\nheavy._hidden()\n",
        "dali_pipelines/__init__.py": "",
        "dali_pipelines/p.py": "import simmatch.heavy\n",
        "tools/t.py": "x = 1\n" * MAX_LINES,
        "simmatch/data/__init__.py": "",
        "simmatch/data/a.py": "from simmatch.run import light\n",  # data -> run ...
        "simmatch/run/up.py": "def f():\n    from simmatch.data import b\n",  # ... and run -> data: a folder cycle
        "simmatch/data/b.py": "x = 1\n",
        "simmatch/engine/one.py": "from simmatch.engine import two\n",  # two files that import each other
        "simmatch/engine/two.py": "from simmatch.engine import one\n",
    })
    light = [tmp_path / "simmatch/run/light.py", tmp_path / "simmatch/run/lazy.py"]
    assert torch_at_import(tmp_path, light) == ["simmatch/run/light.py imports torch at import time"]
    assert imports_of(tmp_path, "simmatch/engine", ("simmatch.weights.export",)) == \
        ["simmatch/engine/loop.py imports simmatch.weights.export"]
    assert imports_of(tmp_path, "dali_pipelines", ("simmatch",)) == ["dali_pipelines/p.py imports simmatch.heavy"]
    crossings = private_crossings(tmp_path, sources(tmp_path))
    assert crossings == ["simmatch/engine/loop.py:3 uses ._step, private to another module",
                         "slurm/job.py:1 imports simmatch.heavy._hidden",
                         "slurm/job.py:3 uses heavy._hidden"], crossings
    assert oversized(tmp_path, sources(tmp_path)) == [f"tools/t.py: {MAX_LINES} lines"]
    assert import_cycles(tmp_path, sources(tmp_path, ("simmatch",))) == [
        "files import each other: simmatch/engine/one.py -> simmatch/engine/two.py",
        "folders import each other: simmatch/data, simmatch/run"]
