"""Pre-flight checks of tools/submit.py on the real local SLURM cluster (4 nodes x 2 CPUs):
a job that could never run, or would fail at start, is refused before sbatch with one line."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytest.register_assert_rewrite("conftest_slurm")

from conftest import call_tool, tiny_overrides  # noqa: E402
from conftest_slurm import NODES, ROOT, run_tool  # noqa: E402
from slurm import submissions  # noqa: E402

pytestmark = pytest.mark.slow

CPU_JOB = ["--slurm", "--gpus-per-node", "0", "--tasks-per-node", "1", "--timeout", "10"]


def one_error(res, *needles: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def test_job_shapes_the_cluster_cannot_run(slurm_env, digits_root, tmp_path):
    data = [f"data.root={digits_root}", f"train.batch_size={12 * (NODES + 1)}"]  # divides by every world size
    for extra, needles in (
            (["--nodes", str(NODES + 1)], [f"--nodes {NODES + 1}", f"partition debug has {NODES} node(s)"]),
            (["--nodes", "1", "--tasks-per-node", "3"], ["3 task(s) x 1 CPU(s) per node = 3 CPUs", "have 2"]),
            (["--nodes", "1", "--partition", "nope"], ["--partition nope", "no such partition", "debug, urgent"])):
        run_dir = tmp_path / f"r{len(extra)}{extra[-1]}"
        res = run_tool("submit.py", "--cfg", "yaml/digits.yaml", *CPU_JOB, *extra, "--run-dir", str(run_dir), *data,
                       env=slurm_env)
        one_error(res, *needles)
        assert not run_dir.exists()  # no empty folder left behind


def test_missing_data_is_refused_before_sbatch(slurm_env, tmp_path):
    run_dir = tmp_path / "r"
    res = run_tool("submit.py", "--cfg", "yaml/digits.yaml", *CPU_JOB, "--nodes", "2", "--run-dir", str(run_dir),
                   f"data.root={tmp_path / 'no_such_data'}", env=slurm_env, timeout=300)
    one_error(res, "pre-flight check failed, nothing submitted", "no_such_data")
    assert "FAIL  data tree and split lists" in res.stdout
    assert not (run_dir / "submissions.jsonl").exists() and not (run_dir / "slurm").exists()


def test_resume_keeps_the_job_shape_and_judges_the_world_size(slurm_env, digits_root, tmp_path):
    run_dir = tmp_path / "r"
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml",  # trained in this process
                    *tiny_overrides(digits_root, run_dir, **{"optim.iters": 2, "train.batch_size": 3}))
    assert res.returncode == 0, res.stderr[-2000:]
    # the run's own submission: 1 node x 1 CPU task (written as tools/submit.py writes it)
    submissions.append_event(run_dir, submissions.SUBMITTED, job_id="1", nodes=1, tasks_per_node=1,
                             gpus_per_node=0, cfg=str(run_dir / "config.yaml"), overrides=[])
    res = run_tool("submit.py", "--resume", str(run_dir), "--dry-run", env=slurm_env)
    assert res.returncode == 0, res.stderr
    assert "#SBATCH --nodes=1" in res.stdout and "#SBATCH --ntasks-per-node=1" in res.stdout
    assert "gpus" not in res.stdout.split("\n\n")[0]  # not the 8-GPU default
    # another world size is an elastic resume, judged before sbatch: 3 images per step cannot be
    # shared by 2 ranks (tests/engine/test_elastic_preflight.py has the accepted case)
    res = run_tool("submit.py", "--resume", str(run_dir), "--slurm", "--nodes", "2", env=slurm_env, timeout=300)
    one_error(res, "train.batch_size=3 does not divide by the world size 2")
    assert [e["event"] for e in submissions.read_events(run_dir)] == [submissions.SUBMITTED]


def test_check_without_training(digits_root, tmp_path):
    """tools/train.py --check: one line per check, exit 0 only when all pass."""
    run_dir = tmp_path / "r"
    ok = subprocess.run([sys.executable, "tools/train.py", "--cfg", "yaml/digits.yaml", "--check", "--world-size",
                         "2", *tiny_overrides(digits_root, run_dir)],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    lines = ok.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines[:-1]] == [
        "ok    config values", "ok    batch at the world size", "ok    data tree and split lists",
        "ok    images decode", "ok    intervals", "ok    run directory"]
    assert "395 val images" in lines[2] and lines[-1] == "6 of 6 checks passed"
    assert lines[4] == ("ok    intervals: log every 1, checkpoint every 8 iterations, eval at the end (of 8) at 2 "
                        "processes; train.ckpt_every=1,000 iterations is longer than this run's 8: clamped to 8 (a "
                        "checkpoint at the end only)")
    assert not run_dir.exists()  # a check writes nothing
    bad = subprocess.run([sys.executable, "tools/train.py", "--cfg", "yaml/digits.yaml", "--check", "--world-size",
                          "3", *tiny_overrides(digits_root, run_dir, **{"data.num_classes": 9})],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert "FAIL  batch at the world size: train.batch_size=8 does not divide by the world size 3" in bad.stdout
    assert "FAIL  data tree and split lists" in bad.stdout and "data.num_classes=9" in bad.stdout


def test_check_sees_a_live_lock_holder(tmp_path):
    """A run directory whose lock a live process holds fails --check; a stale lock file
    naming a dead process (or one on another host) does not, as training takes it over."""
    import os
    import socket

    from simmatch.launch.preflight import lock_holder
    from simmatch.run.lock import RunLock

    lock = RunLock(tmp_path).acquire()
    assert f"pid {os.getpid()} on {socket.gethostname()}" in lock_holder(tmp_path)
    lock.release()
    assert lock_holder(tmp_path) is None
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".lock").write_text(f"host={socket.gethostname()} pid={child.stdout.strip()}\n")
    assert lock_holder(tmp_path) is None  # its holder has exited
    (tmp_path / ".lock").write_text("host=elsewhere pid=1\n")
    assert lock_holder(tmp_path) is None  # nobody holds the flock
