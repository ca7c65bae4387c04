"""A preempted job on 4 emulated nodes ends bit-identical to an uninterrupted 4-process run.

With 3+ ranks the order in which gradients are summed matters (with 2 it does not), so this
is where a resume that combines gradients differently would show. The cluster is restarted
with 4 nodes for this module and back to 2 afterwards (the other SLURM tests expect 2).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.register_assert_rewrite("conftest_slurm")

from conftest import assert_same_weights, final_state  # noqa: E402
from conftest_slurm import CLUSTER_SH, ROOT, SLURM_DIR, events, job_log_tail, metrics_iteration, run_tool, wait_for  # noqa: E402
from slurm.launcher import load_job  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

NODES, ITERS = 4, 12
TINY = ["data.backend=torch", "data.num_threads=0", f"optim.iters={ITERS}", "train.ckpt_every=2",
        "train.log_every=2", "train.batch_size=4", "train.mu=2"]


def _start(nodes: int) -> None:
    env = dict(os.environ, SIMMATCH_SLURM_DIR=SLURM_DIR)
    proc = subprocess.run(["bash", str(CLUSTER_SH), "start", str(nodes)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"local cluster did not start:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def four_nodes(slurm_cluster):
    _start(NODES)
    yield slurm_cluster
    _start(2)


def test_preempted_four_node_job_ends_bit_identical(four_nodes, slurm_env, digits_root, tmp_path):
    digits = digits_root  # what tools/make_digits.py --size 16 writes (tests/cluster/test_slurm_cluster.py runs it)
    data = [f"data.root={digits}", *TINY]
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    reference = subprocess.Popen([sys.executable, "tools/train.py", "--nproc", str(NODES), "--cfg",
                                  "yaml/digits.yaml", *data, f"train.run_dir={ref_dir}"], cwd=ROOT, env=slurm_env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = run_tool("submit.py", "--slurm", "--nodes", str(NODES), "--gpus-per-node", "0", "--tasks-per-node", "1",
                    "--timeout", "30", "--signal-delay", "60", "--max-requeues", "2", "--cfg", "yaml/digits.yaml",
                    "--run-dir", str(run_dir), *data, env=slurm_env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    job = load_job(run_dir, events(run_dir)[0]["job_id"], num_tasks=NODES)
    try:
        seen = wait_for(lambda: metrics_iteration(run_dir) >= 2 and metrics_iteration(run_dir), 600,
                        "the job's first metrics", poll=0.2)
        assert seen < ITERS - 2, "trained too far before it could be interrupted"
        job._interrupt()  # what a preemption sends: SIGTERM, then USR2
        state = job.wait_until_ended(timeout_s=900)
    except BaseException:
        subprocess.run(["scancel", job.job_id])
        print(job_log_tail(run_dir))
        reference.kill()
        raise
    kinds = [e["event"] for e in events(run_dir)]
    assert kinds == ["submitted", "started", "requeued", "started", "finished"], (kinds, state)
    requeued = events(run_dir)[2]["iteration"]
    assert requeued < ITERS
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]
    ours, ref = final_state(run_dir), final_state(ref_dir)
    assert ours["iteration"] == ref["iteration"] == ITERS and len(ours["ranks"]) == NODES
    assert_same_weights(ours, ref)
