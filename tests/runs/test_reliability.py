"""Faults on real training runs: damaged checkpoints (fuzzed), a second writer, a killed
launcher, Ctrl-C, options after the overrides."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, assert_same_weights, call_tool, final_state, tiny_overrides
from simmatch.checkpoint import store
from simmatch.errors import CheckpointError
from simmatch.launch.local import ORPHAN_GRACE_S

pytestmark = pytest.mark.timeout(900)
TRAIN = [sys.executable, "tools/train.py", "--cfg", "yaml/digits.yaml"]


def _iterations(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["iteration"] for r in rows if r["kind"] == "train"]


def _wait_for_iteration(run_dir: Path, iteration: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"training ended early: {proc.communicate()[1][-2000:]}"
        if any(i >= iteration for i in _iterations(run_dir)):
            return
        time.sleep(0.1)
    raise AssertionError("iteration never reached")


def _popen(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


SHORT = {"optim.iters": 6, "train.ckpt_every": 2, "train.keep_ckpts": 5}


@pytest.fixture
def short_run(trained_run, digits_root) -> tuple[Path, list[str]]:
    """A real 6-step run with checkpoints at 2, 4 and 6, and its overrides: this test's own copy of a
    run trained once (conftest.trained_run), which it may damage."""
    run_dir = trained_run(**SHORT)
    return run_dir, tiny_overrides(digits_root, run_dir, **SHORT)


def _damage(path: Path, rng: random.Random, original: bytes) -> int:
    damaged = bytearray(original)
    offset = rng.randrange(0, len(original) - 4096)
    damaged[offset:offset + 4096] = rng.randbytes(4096)
    assert damaged != original
    path.write_bytes(damaged)
    return offset


@pytest.mark.slow
def test_fuzzed_newest_checkpoint_is_rejected_and_the_resume_is_bit_identical(short_run):
    """20 seeded trials of 4 KiB of random bytes written at a random offset of the newest
    checkpoint of a real run: every one is rejected by the loader, which falls back to the
    previous checkpoint; for two of them the run is resumed to the end and its final
    checkpoint is compared with the uninterrupted run's."""
    run_dir, args = short_run
    newest = run_dir / "checkpoints" / "ckpt_000000006.pt"
    previous = run_dir / "checkpoints" / "ckpt_000000004.pt"
    original = newest.read_bytes()
    uninterrupted = torch.load(newest, map_location="cpu", weights_only=True)
    rng = random.Random(20261125)
    for trial in range(20):
        offset = _damage(newest, rng, original)
        with pytest.raises(CheckpointError, match=f"{newest} is damaged"):
            store.read_checkpoint(newest)
        path, state = store.find_checkpoint(newest.parent, required=False)
        assert path == previous and state["iteration"] == 4, (trial, offset)
        if trial < 2:  # resume the real run past the damaged file, to the end (in this process, as it was trained)
            res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", *args)
            assert res.returncode == 0, res.stderr[-3000:]
            assert f"skipping unusable checkpoint: checkpoint {newest} is damaged" in res.stdout
            assert f"resumed from {previous} at iteration 4" in res.stdout
            assert_same_weights(uninterrupted, final_state(run_dir))
            assert store.verify(newest)  # the rewritten checkpoint has a matching digest again


@pytest.mark.slow
def test_readers_reject_a_damaged_checkpoint(short_run, tmp_path, monkeypatch):
    """export and status fall back past a damaged newest checkpoint and name it; eval, export
    and model.init_from given the damaged file itself refuse it; a failed export check leaves
    no file behind."""
    from simmatch.weights import export as export_mod

    run_dir, args = short_run
    newest = run_dir / "checkpoints" / "ckpt_000000006.pt"
    _damage(newest, random.Random(1), newest.read_bytes())
    # the tools in this process (conftest.call_tool; their command lines: tests/engine/test_train.py, the SLURM tests)
    res = call_tool("tools/export.py", str(run_dir), "--out", str(tmp_path / "x" / "r.pth"))
    assert res.returncode == 0, res.stderr
    assert f"checkpoint {newest} is damaged" in res.stderr and "(iteration 4," in res.stdout
    for tool in ("tools/export.py", "tools/eval.py"):
        extra = ["--out", str(tmp_path / "y.pth")] if tool == "tools/export.py" else []
        res = call_tool(tool, str(newest), *extra)
        assert res.returncode == 2 and res.stderr.strip() == (
            f"error: checkpoint {newest} is damaged: its SHA-256 does not match ckpt_000000006.pt.sha256"), res.stderr
    assert not (tmp_path / "y.pth").exists()
    res = call_tool("tools/status.py", str(run_dir))
    assert res.returncode == 0, res.stderr
    assert "checkpoint: iteration 4 (ckpt_000000004.pt), the newest usable one" in res.stdout
    assert "iteration        6 (ckpt_000000006.pt): damaged: its SHA-256 does not match" in res.stdout
    assert "iteration        2 (ckpt_000000002.pt): ok" in res.stdout
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml",
                    *[a for a in args if not a.startswith("train.run_dir=")],
                    f"model.init_from={newest}",
                    f"train.run_dir={tmp_path / 'init'}")
    assert res.returncode == 2 and f"checkpoint {newest} is damaged" in res.stderr, res.stderr
    # the export's own check fails: nothing of it is left behind
    monkeypatch.setattr(export_mod, "verify", lambda *a, **k: 1.0)
    out = tmp_path / "z" / "r.pth"
    result = export_mod.export(run_dir, "teacher", out)
    assert result["written"] == [] and sorted(os.listdir(out.parent)) == []


@pytest.mark.slow
def test_second_writer_is_refused_and_the_first_is_unaffected(digits_root, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    dead = run_dir / "checkpoints" / ".ckpt_000000004.pt.4242.deadbeef.tmp"  # left by a killed writer
    dead.write_bytes(b"\0" * 2**20)
    args = tiny_overrides(digits_root, run_dir, **{"optim.iters": 12, "train.ckpt_every": 4})
    first = _popen([*TRAIN, *args])
    try:
        _wait_for_iteration(run_dir, 1, first)
        # Held still (a stopped process keeps its lock) so that it cannot finish before the
        # second writer has tried: the refusal, not the timing, is under test.
        os.kill(first.pid, signal.SIGSTOP)
        assert not dead.exists(), "a dead writer's temporary file was not removed"
        live = run_dir / "checkpoints" / ".ckpt_000000099.pt.1.live.tmp"  # stands for the first run's
        live.write_bytes(b"x")
        second = call_tool(*TRAIN[1:], *args)  # this process is the second writer
        assert second.returncode == 2
        lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
        assert lines == [f"error: run directory {run_dir} is in use by pid {first.pid} on {socket.gethostname()} "
                         f"(lock {run_dir / '.lock'}); one writer per run directory"], second.stderr
        assert live.exists(), "the refused run removed a live writer's file"
        live.unlink()
        os.kill(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
            first.kill()
    assert first.returncode == 0, err[-3000:]
    assert "removed 1 temporary file(s) (1.0 MB)" in err
    assert _iterations(run_dir) == list(range(1, 13))  # one writer: no doubled metrics
    assert final_state(run_dir)["iteration"] == 12
    assert (run_dir / ".lock").read_text() == ""  # released on exit


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


@pytest.mark.slow
def test_ranks_die_with_their_launcher(digits_root, tmp_path):
    """A SIGKILL to the launcher of `--nproc 3` (each rank runs in its own process group, so the kill
    of the launcher's group does not reach them): no rank outlives it, none keeps the run's lock (the
    same command may start again), and they saved first."""
    from simmatch.run.lock import holder

    run_dir = tmp_path / "run"
    args = tiny_overrides(digits_root, run_dir, **{"optim.iters": 400, "train.batch_size": 12})
    launcher = _popen([*TRAIN, "--nproc", "3", *args])
    try:
        _wait_for_iteration(run_dir, 1, launcher)
        ranks = _children(launcher.pid)
        assert len(ranks) == 3
        assert holder(run_dir) is not None
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        t0 = time.time()
        # SIGTERM: they finish their step and save (seconds; longer on a loaded machine), and
        # end themselves ORPHAN_GRACE_S after the launcher's death at the latest
        while any(_alive(p) for p in ranks) and time.time() - t0 < ORPHAN_GRACE_S + 30:
            time.sleep(0.1)
        gone_s = time.time() - t0
        assert not any(_alive(p) for p in ranks), "ranks outlived their launcher"
        assert holder(run_dir) is None, "a rank's lock outlived the launcher"
    finally:
        for p in _children(launcher.pid) + (ranks if "ranks" in dir() else []):
            if _alive(p):
                os.kill(p, signal.SIGKILL)
    print(f"ranks gone {gone_s:.1f} s after the launcher's SIGKILL")
    assert final_state(run_dir)["iteration"] >= 1  # SIGTERM on the parent's death: they saved first


@pytest.mark.slow
def test_ctrl_c_saves_and_stops_with_options_after_the_overrides(digits_root, tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_overrides(digits_root, run_dir, **{"optim.iters": 400})
    proc = _popen([*TRAIN, *args, "--nproc", "2"])  # --nproc after the overrides
    try:
        _wait_for_iteration(run_dir, 1, proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "Ctrl-C: finishing this step, saving a checkpoint" in err and "Traceback" not in err
    state = final_state(run_dir)
    assert 1 <= state["iteration"] < 400 and state["world_size"] == 2
    assert f"saved at iteration {state['iteration']}, stopping" in out


def test_options_anywhere_on_the_command_line(tmp_path):
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", f"train.run_dir={tmp_path / 'r'}", "--nproc", "3")
    assert res.returncode == 2
    assert res.stderr.strip() == "error: train.batch_size=16 does not divide by the world size 3"
