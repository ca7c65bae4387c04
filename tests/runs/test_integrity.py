"""Checkpoint integrity (digest sidecars), file modes, leftovers, a full disk, the run lock."""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from simmatch.checkpoint import store
from simmatch.checkpoint.saver import CheckpointSaver
from simmatch.errors import CheckpointError
from simmatch.files import atomic
from simmatch.run.lock import RunLock, RunLocked, holder
from simmatch.run.rundir import remove_leftovers

pytestmark = pytest.mark.timeout(120)


def _saved(tmp_path: Path, iterations=(10, 20), keep: int = 5) -> CheckpointSaver:
    saver = CheckpointSaver(tmp_path, keep=keep, background=True)
    for it in iterations:
        saver.save({"format": 2, "iteration": it, "method": {"w": torch.full((4096,), float(it))}}, it)
    saver.wait()
    return saver


@pytest.mark.slow
def test_digest_sidecar_matches_the_file(tmp_path):
    saver = _saved(tmp_path)
    for it in (10, 20):
        path = saver.path_for(it)
        sha, name = atomic.digest_path(path).read_text().split()
        assert name == path.name and sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert subprocess.run(["sha256sum", "-c", "--quiet", "ckpt_000000020.pt.sha256"], cwd=tmp_path).returncode == 0


def test_overwritten_bytes_are_rejected_and_the_previous_one_used(tmp_path, caplog):
    saver = _saved(tmp_path)
    newest = saver.path_for(20)
    with open(newest, "r+b") as f:  # the fault of the issue: 4 KiB overwritten in the middle
        f.seek(newest.stat().st_size // 2)
        f.write(os.urandom(4096))
    with pytest.raises(CheckpointError, match="is damaged: its SHA-256 does not match ckpt_000000020.pt.sha256"):
        store.read_checkpoint(newest)
    path, state = store.find_checkpoint(tmp_path, required=False)
    assert path == saver.path_for(10) and state["iteration"] == 10
    assert "skipping unusable checkpoint" in caplog.text and "ckpt_000000020.pt" in caplog.text
    assert store.usability(newest).startswith("damaged") and store.usability(path) == "ok"


def test_last_and_best_are_checked_too(tmp_path):
    saver = _saved(tmp_path)
    saver.save_best({"format": 2, "iteration": 20, "method": {"w": torch.ones(8)}}, {"iteration": 20})
    saver.wait()
    # last.pt is a symlink: checked against its target's digest
    assert store.read_checkpoint(tmp_path / "last.pt")["iteration"] == 20
    assert store.verify(tmp_path / "best.pt")
    for name in ("ckpt_000000020.pt", "best.pt"):
        with open(tmp_path / name, "r+b") as f:
            f.seek(100)
            f.write(b"\xff" * 64)
    for name in ("last.pt", "best.pt"):
        with pytest.raises(CheckpointError, match="is damaged"):
            store.read_checkpoint(tmp_path / name)
    assert store.find_checkpoint(tmp_path, "last")[1]["iteration"] == 10  # falls back past the damaged one
    with pytest.raises(CheckpointError, match=r"best_000000020\.pt is damaged"):  # best.pt links to it
        store.find_checkpoint(tmp_path, "best")


def test_missing_digest_new_format_refused_old_format_accepted(tmp_path, caplog):
    saver = _saved(tmp_path)
    atomic.digest_path(saver.path_for(20)).unlink()
    with pytest.raises(CheckpointError, match="has no digest file ckpt_000000020.pt.sha256"):
        store.read_checkpoint(saver.path_for(20))
    old = tmp_path / "ckpt_000000005.pt"  # a checkpoint from before digests: format 1, no sidecar
    torch.save({"format": 1, "iteration": 5, "method": {"w": torch.ones(2)}}, old)
    assert store.read_checkpoint(old)["iteration"] == 5
    assert "has no digest" in caplog.text and "ckpt_000000005.pt" in caplog.text
    assert store.usability(old).startswith("no digest")
    assert store.usability(saver.path_for(20)) == "damaged: its digest file ckpt_000000020.pt.sha256 is missing"


def test_pruning_removes_digests_too(tmp_path):
    _saved(tmp_path, iterations=(1, 2, 3, 4), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt_000000003.pt", "ckpt_000000003.pt.sha256", "ckpt_000000004.pt", "ckpt_000000004.pt.sha256", "last.pt"]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_checkpoints_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        saver = _saved(tmp_path, iterations=(1,))
        atomic.atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    finally:
        os.umask(old)
    for p in (saver.path_for(1), atomic.digest_path(saver.path_for(1)), tmp_path / "config.yaml"):
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p


def test_non_tensor_pickle_gets_the_projects_own_line(tmp_path):
    from fractions import Fraction

    p = tmp_path / "ckpt_000000001.pt"
    torch.save({"x": Fraction(1, 3)}, p)
    with pytest.raises(CheckpointError) as err:
        store.read_checkpoint(p)
    msg = str(err.value)
    assert msg == f"checkpoint {p} holds objects other than tensors and plain containers; refusing to unpickle it"
    assert "weights_only" not in msg and "Weights only" not in msg


def test_leftovers_removed(tmp_path):
    _saved(tmp_path, iterations=(1,))
    junk = [tmp_path / ".ckpt_000000002.pt.123.abcd1234.tmp", tmp_path / "ckpt_000000002.pt.sha256"]
    for j in junk:
        j.write_bytes(b"x" * 1000)
    removed = remove_leftovers(tmp_path)
    assert sorted(p for p, _ in removed) == sorted(junk) and all(size == 1000 for _, size in removed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000000001.pt", "ckpt_000000001.pt.sha256", "last.pt"]


DISK_FULL = r"""
import sys, torch
from pathlib import Path
from simmatch.checkpoint import store
from simmatch.checkpoint.saver import CheckpointSaver
from simmatch.errors import CheckpointError
d = Path(sys.argv[1]) / "checkpoints"
saver = CheckpointSaver(d, keep=3, background=True)
state = {"format": 2, "iteration": 1, "method": {"w": torch.ones(1_500_000)}}  # 6 MB
saver.save(state, 1)
saver.wait()
state["iteration"] = 2
saver.save(state, 2)
try:
    saver.wait()
    print("no error")
except CheckpointError as exc:
    print("ERROR", exc)
print("FILES", sorted(p.name for p in d.iterdir()))
print("NEWEST", store.find_checkpoint(d, required=False)[1]["iteration"])
"""


@pytest.mark.slow
def test_disk_full_is_named(tmp_path):
    """A real full file system: a 10 MB tmpfs in a private mount namespace."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    user = [] if os.geteuid() == 0 else ["--map-root-user"]
    script = tmp_path / "disk_full.py"
    script.write_text(DISK_FULL)
    res = subprocess.run(["unshare", *user, "--mount", "sh", "-c",
                          f'mount -t tmpfs -o size=10m tmpfs "{mnt}" && exec "{sys.executable}" "{script}" "{mnt}"'],
                         capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         timeout=100)
    if "mount" in res.stderr and "ERROR" not in res.stdout:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    assert res.returncode == 0, res.stderr
    error = next(line for line in res.stdout.splitlines() if line.startswith("ERROR"))
    assert f"disk full: checkpoint {mnt}/checkpoints/ckpt_000000002.pt needs about 5.7 MB" in error, error
    assert f"{mnt}/checkpoints had " in error and "previous checkpoint is kept" in error
    assert "FILES ['ckpt_000000001.pt', 'ckpt_000000001.pt.sha256', 'last.pt']" in res.stdout  # no temp file left
    assert "NEWEST 1" in res.stdout


HOLDER = r"""
import sys, time
from simmatch.run.lock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_one_writer_per_run_dir_and_a_dead_holder_is_detected(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=f"in use by pid {proc.pid} on "):
            RunLock(tmp_path).acquire(wait_s=0.2)
        assert holder(tmp_path).startswith(f"pid {proc.pid} on ")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    lock = RunLock(tmp_path).acquire(wait_s=0.2)  # the kernel released the dead holder's lock
    assert lock.previous.startswith(f"pid {proc.pid} on ")  # ... whose name is still in the file
    assert holder(tmp_path).startswith(f"pid {os.getpid()} on ")
    lock.release()
    assert holder(tmp_path) is None
    again = RunLock(tmp_path).acquire(wait_s=0.2)
    assert again.previous is None  # released cleanly
    again.release()


KILLED_BEST = """
import os, signal, sys, torch
from simmatch.checkpoint import saver as module
folder, value, kill_at = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
calls = []
def counted(fn):
    def call(*args, **kwargs):
        out = fn(*args, **kwargs)
        calls.append(fn.__name__)
        if len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    return call
for name in ("save_checkpoint", "replace_symlink", "atomic_write_text"):
    setattr(module, name, counted(getattr(module, name)))
saver = module.CheckpointSaver(folder, background=False)
saver.save_best({"format": 2, "v": torch.tensor([value])}, {"metric": "m", "value": value, "iteration": int(value)})
"""
# the steps of a best.pt rewrite: the new file with its digest, the digest link, the file link, best.json
BEST_STEPS = [1, 2, 3, 4]


def _best_after_kill(folder: Path, value: float, kill_at: int) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLED_BEST, str(folder), str(value), str(kill_at)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", BEST_STEPS)
def test_best_killed_at_any_step_twice_in_a_row_stays_a_whole_pair(tmp_path, kill_at):
    """best.pt used to be rewritten in place, its sidecar listing the old and the new digest during
    the rewrite: two kills in a row inside that window left an intact best.pt reading as damaged,
    and during one kill `sha256sum -c best.pt.sha256` failed. Now best.pt and its sidecar are links
    to a file written once: after a SIGKILL at any step, even twice in a row, best.pt reads as whole
    (the old or the new one) and sha256sum confirms it."""
    from simmatch.checkpoint.saver import CheckpointSaver

    saver = CheckpointSaver(tmp_path, background=False)
    saver.save_best({"format": 2, "v": torch.tensor([1.0])}, {"metric": "m", "value": 1.0, "iteration": 1})
    for value in (2.0, 3.0):  # two kills in a row at the same step
        _best_after_kill(tmp_path, value, kill_at)
        got = float(store.read_checkpoint(tmp_path / "best.pt")["v"])
        assert got in (1.0, 2.0, value), got
        check = subprocess.run(["sha256sum", "-c", "--quiet", "best.pt.sha256"], cwd=tmp_path,
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    assert got == (3.0 if kill_at >= 3 else 1.0)  # best.pt moves to the new file at step 3
    saver.save_best({"format": 2, "v": torch.tensor([4.0])}, {"metric": "m", "value": 4.0, "iteration": 4})
    assert float(store.read_checkpoint(tmp_path / "best.pt")["v"]) == 4.0
    assert [p.name for p in tmp_path.glob("best_*.pt")] == ["best_000000004.pt"]  # older ones removed
    assert store.best_record(tmp_path)["value"] == 4.0
