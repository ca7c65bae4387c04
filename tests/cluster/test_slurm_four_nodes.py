"""A preempted job on 4 emulated nodes requeues, resumes from its checkpoint and ends
bit-identical to the uninterrupted 4-process run; the tools report it.

The digits demo goes through tools/submit.py on 4 nodes x 1 CPU task and is interrupted the way
a preemption does it (submitit's job._interrupt(): SIGTERM + USR2). With 3+ ranks the order in
which gradients are summed matters (with 2 it does not), so this is where a resume that
combines gradients differently would show. The reference is conftest's four_rank_reference
(DALI), which tests/engine/test_train.py and tests/data/test_shards_training.py end at too; the
session's cluster has 4 nodes (conftest_slurm.NODES).
"""
from __future__ import annotations

import subprocess

import pytest

pytest.register_assert_rewrite("conftest_slurm")

from conftest import FOUR_RANKS, assert_same_weights, final_state, four_rank_overrides  # noqa: E402
from conftest_slurm import NODES, events, job_log_tail, metrics_iteration, run_tool, wait_for  # noqa: E402
from slurm.launcher import load_job  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ITERS = FOUR_RANKS["optim.iters"]


def test_preempted_four_node_job_ends_bit_identical(four_rank_reference, slurm_env, digits_root, tmp_path):
    assert NODES >= 4
    run_dir = tmp_path / "run"
    data = four_rank_overrides(digits_root, run_dir, **{"train.ckpt_every": 2, "train.log_every": 2})
    proc = run_tool("submit.py", "--slurm", "--nodes", "4", "--gpus-per-node", "0", "--tasks-per-node", "1",
                    "--timeout", "30", "--signal-delay", "60", "--max-requeues", "2", "--cfg", "yaml/digits.yaml",
                    "--run-dir", str(run_dir), *data, env=slurm_env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    job = load_job(run_dir, events(run_dir)[0]["job_id"], num_tasks=4)
    try:
        seen = wait_for(lambda: metrics_iteration(run_dir) >= 2 and metrics_iteration(run_dir), 600,
                        "the job's first metrics", poll=0.2)
        assert seen < ITERS - 2, "trained too far before it could be interrupted"
        job._interrupt()  # what a preemption sends: SIGTERM, then USR2
        state = job.wait_until_ended(timeout_s=900)
    except BaseException:
        subprocess.run(["scancel", job.job_id])
        print(job_log_tail(run_dir))
        raise
    results = job.results()
    assert [r.status for r in results] == ["finished"] * 4, job_log_tail(run_dir)
    assert all(r.iteration == ITERS for r in results)
    kinds = [e["event"] for e in events(run_dir)]
    assert kinds == ["submitted", "started", "requeued", "started", "finished"], (kinds, state)
    requeue = events(run_dir)[2]
    assert requeue["reason"] == "preemption" and seen <= requeue["iteration"] < ITERS
    assert events(run_dir)[3]["restart"] == 1
    assert f"resumed from {run_dir}/checkpoints/ckpt_{requeue['iteration']:09d}.pt" in \
        (run_dir / "log_rank0.txt").read_text()

    ours, ref = final_state(run_dir), final_state(four_rank_reference)
    assert ours["iteration"] == ref["iteration"] == ITERS and len(ours["ranks"]) == 4
    assert ours["config"]["data"]["backend"] == "dali"
    assert_same_weights(ours, ref)

    status = run_tool("status.py", str(run_dir), env=slurm_env)
    assert status.returncode == 0, status.stderr
    assert f"checkpoint: iteration {ITERS}" in status.stdout
    assert "requeued  reason=preemption" in status.stdout and "eval:" in status.stdout
    assert status.stdout.splitlines()[1].split()[1] in ("COMPLETED", "COMPLETING", "RUNNING")
