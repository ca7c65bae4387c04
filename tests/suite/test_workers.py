"""The suite on pytest-xdist's workers (tests/conftest_workers.py): the groups that keep a module's
tests, and the local SLURM cluster's tests, in one worker; runs shared by the workers, built once."""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest_workers import built_once


def _group(item) -> str:
    marks = [m.args[0] for m in item.iter_markers("xdist_group")]
    assert len(marks) == 1, (item.nodeid, marks)
    return marks[0]


def test_every_module_is_one_group_and_the_cluster_tests_are_one(request):
    """Read off this session's collected tests (all of them, slow ones too, whatever `-m` keeps)."""
    items = request.session.items
    by_module: dict[str, set[str]] = defaultdict(set)
    for item in items:
        by_module[item.nodeid.split("::")[0].split("@")[0]].add(_group(item))
    assert all(len(groups) == 1 for groups in by_module.values()), by_module  # no module split
    for item in items:
        if {"slurm_cluster", "slurm_env"} & set(item.fixturenames):
            assert _group(item) == "slurm", item.nodeid
    here = by_module["tests/suite/test_workers.py"]
    assert here == {"tests/suite/test_workers.py"}  # a module of no cluster test is its own group


def _factory(base: Path) -> SimpleNamespace:
    """tmp_path_factory as a worker sees it: its own folder under the run's shared one."""
    (base / "popen-gw0").mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(getbasetemp=lambda: base / "popen-gw0")


def test_built_once_builds_once_for_workers_asking_at_the_same_time(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    builds, paths = [], []

    def build(folder: Path) -> None:
        builds.append(folder)
        time.sleep(0.3)  # the other asker arrives while this one builds
        (folder / "made").write_text("x")

    def ask() -> None:
        paths.append(built_once(_factory(tmp_path), "run", build))

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds == [tmp_path / "run"] and paths == [tmp_path / "run"] * 3
    assert (tmp_path / "run" / "made").read_text() == "x"


def test_built_once_after_a_failed_build_fails_with_a_line_naming_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")

    def broken(folder: Path) -> None:
        raise RuntimeError("training failed")

    with pytest.raises(RuntimeError, match="training failed"):
        built_once(_factory(tmp_path), "run", broken)
    with pytest.raises(AssertionError, match="half-built"):
        built_once(_factory(tmp_path), "run", lambda folder: None)
