"""The two test tiers (pyproject.toml, tests/conftest.py): a test not marked slow stays in this
process; starting a subprocess or spawning ranks fails it with a line that says what to do."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

import conftest
from conftest import GUARD_MESSAGE, call_tool


def _rank(rank: int) -> None:  # never runs: the guard refuses first
    raise AssertionError("a rank was started")


@pytest.mark.parametrize("start", [
    lambda: subprocess.run([sys.executable, "-c", "pass"], timeout=60),
    lambda: subprocess.Popen(["true"]).wait(),
    lambda: subprocess.check_output("true", shell=True),
    lambda: os.system("true"),
    lambda: mp.spawn(_rank, nprocs=2),
    lambda: mp.start_processes(_rank, nprocs=2, start_method="spawn"),
], ids=["run", "popen", "shell", "os.system", "spawn", "start_processes"])
def test_a_test_not_marked_slow_cannot_start_a_process(start, request):
    assert request.node.get_closest_marker("slow") is None
    with pytest.raises(pytest.fail.Exception, match=GUARD_MESSAGE):
        start()


def test_dataloader_workers_are_allowed():
    """Forked DataLoader workers (the torch data backend with num_workers > 0) are no subprocess."""
    loader = torch.utils.data.DataLoader(list(range(6)), batch_size=2, num_workers=2)
    assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4, 5]]


def test_a_tool_called_in_this_process_gives_what_its_command_line_gives():
    res = call_tool("tools/summarize.py", "/no/such/run")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1, res.stderr


@pytest.mark.slow
def test_a_slow_test_may_start_processes_and_the_guard_also_covers_fixture_setup():
    """The guard is on for the setup of a test not marked slow too (its fixtures, of any scope)."""
    assert subprocess.run(["true"], timeout=60).returncode == 0
    fast = SimpleNamespace(nodeid="tests/x.py::test_fast", get_closest_marker=lambda name: None)
    for hook in (conftest.pytest_runtest_setup, conftest.pytest_runtest_call):
        wrapper = hook(fast)
        next(wrapper)  # the phase of the fast test begins
        with pytest.raises(pytest.fail.Exception, match=f"tests/x.py::test_fast {GUARD_MESSAGE}"):
            subprocess.run(["true"], timeout=60)
        with pytest.raises(StopIteration):
            wrapper.send(None)  # ... and ends
        assert subprocess.run(["true"], timeout=60).returncode == 0


def test_tests_on_processes_are_marked_slow_by_their_fixtures(request, gloo):
    """The gloo (and SLURM, trained-run) fixtures put a test in the slow tier without a mark of its own."""
    assert request.node.get_closest_marker("slow") is not None
    assert "slow" in [m.name for m in request.node.own_markers]  # added by conftest, not by a decorator
