"""Elastic resume on the real local SLURM cluster: a run stopped on 2 nodes goes on on 1 node
through `tools/submit.py --resume RUN --nodes 1`, and ends bit-identical to resuming a copy of
the stopped run directory in one local process (the same elastic 2 -> 1 resume, without SLURM)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.register_assert_rewrite("conftest_slurm")

from conftest import assert_same_weights, final_state  # noqa: E402
from conftest_slurm import ROOT, events, job_log_tail, run_tool, wait_for  # noqa: E402
from simmatch.run.rundir import RunDir  # noqa: E402
from slurm.launcher import load_job  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ITERS = 30  # at the reference batch, which 2 ranks have: 60 steps of the 1-rank batch
# torch data without worker processes: SLURM signals every process of a step (docs/SLURM.md);
# train.scale=per_gpu with 2 labeled images per rank and a reference batch of 4: on 1 rank the
# global batch halves, so every step count (iteration, optim.iters, intervals) doubles
TINY = ["data.backend=torch", "data.num_threads=0", f"optim.iters={ITERS}", "train.ckpt_every=2",
        "train.log_every=2", "train.scale=per_gpu", "train.batch_per_gpu=2", "optim.base_batch=4",
        "train.mu=2"]
JOB = ["--slurm", "--gpus-per-node", "0", "--tasks-per-node", "1", "--timeout", "30"]


def _newest_checkpoint(run_dir: Path) -> int:
    newest = RunDir(run_dir).newest_checkpoint()
    return newest[0] if newest else -1


def test_elastic_slurm_two_nodes_to_one(slurm_env, digits_root, tmp_path):
    digits = digits_root  # what tools/make_digits.py --size 16 writes (tests/cluster/test_slurm_cluster.py runs it)
    run_dir, copy_dir = tmp_path / "run", tmp_path / "copy"
    proc = run_tool("submit.py", *JOB, "--nodes", "2", "--cfg", "yaml/digits.yaml", "--run-dir", str(run_dir),
                    f"data.root={digits}", *TINY, env=slurm_env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    job = load_job(run_dir, events(run_dir)[0]["job_id"], num_tasks=2)
    try:
        wait_for(lambda: _newest_checkpoint(run_dir) >= 4, 600, "a checkpoint past iteration 2", poll=0.2)
        # scancel: SIGTERM without USR2, so the ranks save together and the run stops, not requeued
        subprocess.run(["scancel", job.job_id], check=True, env=slurm_env)
        assert job.wait_until_ended(timeout_s=120) == "CANCELLED"
        stopped = wait_for(lambda: next((e for e in events(run_dir) if e["event"] == "stopped"), None), 60,
                           "the stopped event")
    except BaseException:
        subprocess.run(["scancel", job.job_id])
        print(job_log_tail(run_dir))
        raise
    left_at = stopped["iteration"]
    assert 4 <= left_at < ITERS and _newest_checkpoint(run_dir) == left_at, (stopped, events(run_dir))
    shutil.copytree(run_dir, copy_dir, ignore=shutil.ignore_patterns("slurm", "submissions.jsonl", ".lock"))

    resumed = run_tool("submit.py", "--resume", str(run_dir), "--nodes", "1", "--slurm", env=slurm_env, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"elastic resume 2 -> 1 ranks: 4 -> 2 labeled images per step, lr 0.05 -> 0.025, iteration " \
           f"{left_at} -> {2 * left_at} of {2 * ITERS}" in resumed.stdout, resumed.stdout
    assert "#SBATCH" not in resumed.stdout and "submitted job" in resumed.stdout
    # the reference: the copied run directory resumed in one local process, meanwhile
    local = subprocess.Popen([sys.executable, "tools/train.py", "--cfg", str(copy_dir / "config.yaml"),
                              f"train.run_dir={copy_dir}"], cwd=ROOT, env=slurm_env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    second = load_job(run_dir, events(run_dir)[-1]["job_id"], num_tasks=1)
    try:
        assert second.job_id != job.job_id
        assert second.wait_until_ended(timeout_s=600) == "COMPLETED", job_log_tail(run_dir)
    except BaseException:
        subprocess.run(["scancel", second.job_id])
        local.kill()
        raise
    assert local.wait(timeout=600) == 0, local.stderr.read()[-3000:]

    kinds = [e["event"] for e in events(run_dir)]
    assert kinds == ["submitted", "started", "stopped", "submitted", "started", "finished"], kinds
    assert events(run_dir)[3]["nodes"] == 1 and events(run_dir)[4]["world_size"] == 1
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumes = [r for r in records if r.get("kind") == "resume"]
    assert [(r["from_world_size"], r["from_iteration"], r["world_size"], r["iteration"]) for r in resumes] == \
        [(2, left_at, 1, 2 * left_at)]  # as many images: twice the steps of half the batch
    status = run_tool("status.py", str(run_dir), env=slurm_env)
    assert status.returncode == 0, status.stderr
    assert f"world sizes: 2 ranks (iterations 0-{left_at}), 1 rank (from iteration {2 * left_at})" in status.stdout, \
        status.stdout
    ours, ref = final_state(run_dir), final_state(copy_dir)
    assert ours["iteration"] == ref["iteration"] == 2 * ITERS and ours["world_size"] == 1
    assert_same_weights(ours, ref)
