"""The suite on pytest-xdist's workers (pyproject.toml's addopts: `-n auto --dist loadgroup`).

One worker per core, at most 4: the multi-rank tests start ranks of their own, and more workers
would start more ranks at once than a small machine has cores for. Each worker keeps one intra-op
thread. Tests are scheduled in groups: a module's tests stay in one worker (its module-scoped
fixtures are built once), and every test on the local SLURM cluster runs in one worker (one cluster,
whose 4 nodes take one multi-node job at a time). The runs that tests of several modules read are
built once per test run (`built_once`), whichever worker asks first. `-n 0` runs the suite in the
pytest process itself.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

MAX_WORKERS = 4
SLURM_FIXTURES = frozenset({"slurm_cluster", "slurm_env"})


def pytest_xdist_auto_num_workers(config) -> int:
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        # The workers share the cores. The processes a test starts get one thread too, as the test's
        # own in-process runs do: a run compared bit for bit with another must sum in the same order.
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"


def module_of(item) -> str:
    return item.nodeid.split("::")[0]


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups off the marks
def pytest_collection_modifyitems(config, items):
    """Each test's xdist group: its module, or "slurm" for every test of a module with a test on the
    local cluster (such a module's module-scoped fixtures serve both kinds)."""
    on_cluster = {module_of(i) for i in items if SLURM_FIXTURES & set(getattr(i, "fixturenames", ()))}
    for item in items:
        if not item.get_closest_marker("xdist_group"):
            module = module_of(item)
            item.add_marker(pytest.mark.xdist_group("slurm" if module in on_cluster else module))


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The directory `name`, filled by build(directory) once per test run. Under xdist the workers
    share it: the first to ask builds it behind a file lock, the others wait for it and read it. A
    build that failed leaves the folder without its mark, and the next worker to ask fails too."""
    from filelock import FileLock

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        path = tmp_path_factory.mktemp(name)
        build(path)
        return path
    shared = tmp_path_factory.getbasetemp().parent  # the run's base folder, above each worker's own
    path, built = shared / name, shared / f"{name}.built"
    with FileLock(str(shared / f"{name}.lock")):
        if not built.exists():
            assert not path.exists(), f"{path} was left half-built by a failed build in another worker"
            path.mkdir()
            build(path)
            built.touch()
    return path
