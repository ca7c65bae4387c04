"""Real jobs on the local SLURM cluster (slurm/local_cluster.sh): cancel and resume, time-outs
beyond --max-requeues, a finished run. The preempted job that requeues and ends bit-identical is
tests/cluster/test_slurm_four_nodes.py's. Skipped only where SLURM cannot be installed (not root,
no apt).
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.register_assert_rewrite("conftest_slurm")

from conftest_slurm import ROOT, events, job_log_tail, metrics_iteration, run_tool, wait_for  # noqa: E402
from slurm.jobstate import job_state  # noqa: E402
from slurm.launcher import JobSpec, TrainJob, load_job, make_executor, submit, submitit_folder  # noqa: E402

pytestmark = pytest.mark.slow

ITERS = 30
# torch data without worker processes: SLURM signals every process of a step, and torch's
# DataLoader workers die on SIGTERM (see docs/SLURM.md).
TINY = ["data.backend=torch", "data.num_threads=0", f"optim.iters={ITERS}", "train.ckpt_every=5",
        "train.log_every=5", "train.batch_size=4", "train.mu=2"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_digits.py"), "--out", str(out), "--size", "16"],
                   check=True, capture_output=True)
    return out


def test_cancelled_run_is_reported_and_resumes(slurm_env, digits, tmp_path):
    """scancel: the tools say CANCELLED at once (never wait); --resume continues the run."""
    run_dir = tmp_path / "run"
    job_args = ["--slurm", "--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "1", "--timeout", "30"]
    proc = run_tool("submit.py", *job_args, "--cfg", "yaml/digits.yaml", "--run-dir", str(run_dir),
                    f"data.root={digits}", *TINY, env=slurm_env)
    assert proc.returncode == 0, proc.stderr
    job = load_job(run_dir, events(run_dir)[0]["job_id"], num_tasks=2)

    held_dir = tmp_path / "pending"  # a job cancelled before it ever ran: no result file will come
    ex = make_executor(JobSpec(nodes=1, gpus_per_node=0, job_name="held"), submitit_folder(held_dir))
    ex.update_parameters(additional_parameters={"requeue": True, "hold": True})
    held = ex.submit(TrainJob(None, [], str(held_dir)))
    assert job_state(held.job_id) == "PENDING"

    wait_for(lambda: metrics_iteration(run_dir) >= 5, 120, "the job's first metrics", poll=0.2)
    t0 = time.time()
    subprocess.run(["scancel", job.job_id, held.job_id], check=True)
    assert job.wait_until_ended(timeout_s=60) == "CANCELLED"
    assert held.wait_until_ended(timeout_s=30) == "CANCELLED"
    held._results_timeout_s = 2  # submitit waits 15 s for a late result file by default
    with pytest.raises(Exception, match="has not produced any output"):
        held.results()  # an error, not an endless wait
    status = run_tool("status.py", str(run_dir), "--wait", "--timeout", "60", env=slurm_env)
    assert status.returncode == 1 and "state:      CANCELLED" in status.stdout, status.stdout
    assert time.time() - t0 < 60
    stopped = events(run_dir)[-1]
    assert stopped["event"] == "stopped" and stopped["reason"].startswith("cancelled"), events(run_dir)

    again = run_tool("submit.py", *job_args, "--cfg", "yaml/digits.yaml", "--run-dir", str(run_dir), env=slurm_env)
    assert again.returncode == 2 and "--resume" in again.stderr  # never a second run over the first
    proc = run_tool("submit.py", *job_args, "--resume", str(run_dir), env=slurm_env)
    assert proc.returncode == 0, proc.stderr
    resumed = load_job(run_dir, events(run_dir)[-1]["job_id"], num_tasks=2)
    assert resumed.job_id != job.job_id
    assert resumed.wait_until_ended(timeout_s=180) == "COMPLETED", job_log_tail(run_dir)
    assert [r.iteration for r in resumed.results()] == [ITERS, ITERS]
    assert f"resumed from {run_dir}/checkpoints/ckpt_{stopped['iteration']:09d}.pt" in \
        (run_dir / "log_rank0.txt").read_text()
    assert events(run_dir)[-1]["event"] == "finished"
    finished_is_not_resubmitted(run_dir, slurm_env)


def finished_is_not_resubmitted(run_dir, slurm_env) -> None:
    """`submit.py --resume` of a finished run: the pre-flight says so and nothing is submitted;
    submitted anyway (--skip-check), the job reports the result and ends (it used to requeue
    itself as a preemption, over and over, never counted against --max-requeues)."""
    before = events(run_dir)
    shape = ["--slurm", "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "1", "--timeout", "10"]
    refused = run_tool("submit.py", "--resume", str(run_dir), *shape, env=slurm_env)
    assert refused.returncode != 0 and f"the run is finished (iteration {ITERS} of {ITERS})" in refused.stdout
    assert refused.stderr.strip().splitlines()[-1].startswith("error: ") and "nothing submitted" in refused.stderr
    assert events(run_dir) == before
    forced = run_tool("submit.py", "--resume", str(run_dir), *shape, "--skip-check", env=slurm_env)
    assert forced.returncode == 0, forced.stderr
    job_id = events(run_dir)[-1]["job_id"]
    job = load_job(run_dir, job_id, num_tasks=1)
    try:
        assert job.wait_until_ended(timeout_s=120) == "COMPLETED", job_log_tail(run_dir)
    except BaseException:
        subprocess.run(["scancel", job_id])
        raise
    assert [e["event"] for e in events(run_dir)[len(before):]] == ["submitted", "started", "finished"]
    assert [r.status for r in job.results()] == ["already_finished"]


def test_timeouts_beyond_max_requeues_stop_the_run(slurm_env, tmp_path, monkeypatch):
    """timeout_min < ~11: submitit counts every USR2 as a time-out; max_requeues=0 ends the run."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))
    run_dir = tmp_path / "r"
    spec = JobSpec(nodes=2, gpus_per_node=0, tasks_per_node=1, timeout_min=5, signal_delay_s=30,
                   max_requeues=0, job_name="timeouts")
    job = submit(TrainJob(None, ["optim.iters=500", "fake.step_s=0.2"], str(run_dir),
                          entry="conftest_slurm:fake_run"), spec)
    wait_for(lambda: metrics_iteration(run_dir) >= 2, 60, "the stand-in to train")
    job._interrupt(timeout=True)  # USR2 only, as before a time limit
    assert job.wait_until_ended(timeout_s=60) == "FAILED"
    with pytest.raises(Exception, match="timed-out too many times"):
        job.results()
    last = events(run_dir)[-1]
    assert last["event"] == "stopped" and "max-requeues" in last["reason"]
