"""Imports point down the layers only (docs/ARCHITECTURE.md): a package never imports the
packages that build on it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

# package -> the packages above it, which it must not import
FORBIDDEN = {"dali_pipelines": ("simmatch",)}


def imported_modules(path: Path) -> set[str]:
    """Every module named by an import statement of `path` (absolute imports)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_points_up(package):
    upward = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in imported_modules(path):
            if name.split(".")[0] in FORBIDDEN[package]:
                upward.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not upward, upward


@pytest.mark.parametrize("package", ["simmatch/methods", "simmatch/models"])
def test_methods_and_models_do_not_import_the_engine(package):
    """The engine drives the methods; a method needs nothing from it (the phase timer lives
    in simmatch/timing.py)."""
    upward = [f"{path.relative_to(ROOT)} imports {name}"
              for path in sorted((ROOT / package).rglob("*.py"))
              for name in imported_modules(path) if name.startswith("simmatch.engine")]
    assert not upward, upward
