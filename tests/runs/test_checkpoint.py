"""Atomic checkpoints: kill mid-write, corrupt newest, pruning, weights_only loading."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import save_unchecked
from simmatch.checkpoint import store
from simmatch.checkpoint.saver import CheckpointSaver
from simmatch.errors import CheckpointError
from simmatch.run.rundir import list_checkpoints

WRITER = r"""
import sys, torch
from simmatch.checkpoint.saver import CheckpointSaver
saver = CheckpointSaver(sys.argv[1], keep=3, background=False)
saver.save({"iteration": 1, "w": torch.ones(3)}, 1)
print("first", flush=True)
saver.save({"iteration": 2, "w": torch.zeros(150_000_000)}, 2)  # 600 MB: slow enough to be killed
print("second", flush=True)
"""


@pytest.mark.slow
def test_kill_during_write_leaves_previous_loadable(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "first"
    deadline = time.time() + 60
    while not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
        assert time.time() < deadline, "the second checkpoint never started"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [i for i, _ in list_checkpoints(tmp_path)] == [1]
    path, state = store.find_checkpoint(tmp_path, required=False)
    assert path.name == "ckpt_000000001.pt" and torch.equal(state["w"], torch.ones(3))


def test_corrupt_newest_falls_back(tmp_path, caplog):
    saver = CheckpointSaver(tmp_path, keep=5, background=True)
    for it in (10, 20):
        saver.save({"iteration": it, "w": torch.full((4,), float(it))}, it)
    saver.wait()
    newest = saver.path_for(20)
    newest.write_bytes(newest.read_bytes()[:50])  # truncated
    path, state = store.find_checkpoint(tmp_path, required=False)
    assert state["iteration"] == 10
    assert "skipping unusable checkpoint" in caplog.text and "ckpt_000000020.pt" in caplog.text


def test_keep_last_n(tmp_path):
    saver = CheckpointSaver(tmp_path, keep=2, background=True)
    for it in range(1, 6):
        saver.save({"iteration": it}, it)
    saver.wait()
    assert [i for i, _ in list_checkpoints(tmp_path)] == [4, 5]


def test_background_save_is_a_snapshot(tmp_path):
    saver = CheckpointSaver(tmp_path, keep=2, background=True)
    w = torch.zeros(1000)
    saver.save({"w": w}, 1)
    w.add_(1)  # training goes on while the file is written
    saver.wait()
    assert torch.equal(store.read_checkpoint(saver.path_for(1))["w"], torch.zeros(1000))


def test_no_arbitrary_objects(tmp_path):
    from fractions import Fraction  # any class outside the weights-only allow-list

    p = tmp_path / "ckpt_000000001.pt"
    torch.save({"x": Fraction(1, 3)}, p)
    with pytest.raises(CheckpointError, match="refusing to unpickle it"):
        store.read_checkpoint(p)


def test_resolve(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        store.find_checkpoint(tmp_path)[0]
    (tmp_path / "checkpoints").mkdir()
    save_unchecked({"a": 1}, tmp_path / "checkpoints" / "ckpt_000000007.pt")
    assert store.find_checkpoint(tmp_path)[0].name == "ckpt_000000007.pt"
