"""tools/status.py and the submissions log against a real local SLURM cluster: a pending job, a job
cancelled while pending after a requeue, a job SLURM has forgotten, an admin's `scontrol requeue`."""
from __future__ import annotations

import subprocess
import time

import pytest

pytest.register_assert_rewrite("conftest_slurm")

from conftest_slurm import ROOT, events, job_log_tail, metrics_iteration, run_tool, wait_for  # noqa: E402
from slurm import submissions  # noqa: E402
from slurm.jobstate import job_state  # noqa: E402
from slurm.launcher import JobSpec, TrainJob, submit  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _sbatch_held(env: dict) -> str:
    out = subprocess.run(["sbatch", "--parsable", "--hold", "--requeue", "-N1", "-o", "/dev/null",
                          "--wrap", "sleep 60"], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def _state_line(stdout: str) -> str:
    return next(ln for ln in stdout.splitlines() if ln.startswith("state:"))


def test_pending_then_cancelled_while_pending(slurm_env, tmp_path):
    """A requeued job cancelled while it pends logs no end of its own: status shows the pending job
    without empty fields, and --wait returns at once with CANCELLED."""
    job_id = _sbatch_held(slurm_env)
    try:
        for event, extra in ((submissions.SUBMITTED, {}), (submissions.STARTED, {"restart": 0}),
                             (submissions.REQUEUED, {"reason": "preemption", "iteration": 5})):
            submissions.append_event(tmp_path, event, job_id=job_id, **extra)
        assert job_state(job_id) == "PENDING"
        status = run_tool("status.py", str(tmp_path), env=slurm_env)
        assert status.returncode == 0, status.stderr
        line = _state_line(status.stdout)
        assert line.startswith(f"state:      PENDING (job {job_id}, restarts 0, reason "), line
        assert " on " not in line and ", ," not in line and "(null)" not in line
        assert not any(ln.rstrip().endswith("=") or "= " in ln for ln in status.stdout.splitlines()), status.stdout
    finally:
        subprocess.run(["scancel", job_id], env=slurm_env, check=True)
    t0 = time.time()
    status = run_tool("status.py", str(tmp_path), "--wait", "--timeout", "60", env=slurm_env)
    assert status.returncode == 1 and _state_line(status.stdout).startswith("state:      CANCELLED"), status.stdout
    assert time.time() - t0 < 30


def test_wait_ends_for_a_job_slurm_has_forgotten(slurm_env, tmp_path):
    """After MinJobAge SLURM no longer knows a job; with no end in the log --wait still returns
    (NOT_FOUND counts as ended) and says why. Job 1 is below this cluster's FirstJobId: never known."""
    for event, extra in ((submissions.SUBMITTED, {}), (submissions.STARTED, {"restart": 0}),
                         (submissions.REQUEUED, {"reason": "preemption", "iteration": 5})):
        submissions.append_event(tmp_path, event, job_id="1", **extra)
    assert job_state("1") == "NOT_FOUND"
    t0 = time.time()
    status = run_tool("status.py", str(tmp_path), "--wait", "--timeout", "60", env=slurm_env)
    assert status.returncode == 1, (status.stdout, status.stderr)
    assert _state_line(status.stdout).startswith("state:      NOT_FOUND (job 1: SLURM no longer knows it")
    assert "counted as ended" in status.stderr
    assert time.time() - t0 < 30


def test_admin_requeue_is_logged_as_requeue(slurm_env, tmp_path, monkeypatch):
    """`scontrol requeue` sends SIGTERM alone and restarts the job: the log says requeued by
    SLURM, never stopped/cancelled, and the run finishes."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))
    run_dir = tmp_path / "r"
    spec = JobSpec(nodes=2, gpus_per_node=0, tasks_per_node=1, timeout_min=5, signal_delay_s=30,
                   max_requeues=2, job_name="admin-requeue")
    job = submit(TrainJob(None, ["optim.iters=12", "fake.step_s=0.2"], str(run_dir),
                          entry="conftest_slurm:fake_run"), spec)
    try:
        wait_for(lambda: metrics_iteration(run_dir) >= 2, 120, "the stand-in to train")
        subprocess.run(["scontrol", "requeue", job.job_id], env=slurm_env, check=True)
        wait_for(lambda: [e["event"] for e in events(run_dir)][-1:] == ["finished"], 240, "the run to finish")
    except BaseException:
        subprocess.run(["scancel", job.job_id], env=slurm_env)
        print(job_log_tail(run_dir))
        raise
    kinds = [(e["event"], e.get("reason")) for e in events(run_dir)]
    assert kinds == [("submitted", None), ("started", None), ("requeued", "requeued by SLURM (scontrol requeue)"),
                     ("started", None), ("finished", None)], kinds
    assert events(run_dir)[3]["restart"] == 1
    status = run_tool("status.py", str(run_dir), env=slurm_env)
    assert "requeued  reason=requeued by SLURM" in status.stdout and "stopped" not in status.stdout, status.stdout
