"""Pre-flight of an elastic resume, without SLURM: `tools/train.py --check --world-size N` on a
run directory holding a real checkpoint judges the new world size (ok with what changes, FAIL
naming the key that cannot scale), and tools/submit.py carries --allow-config-change into the job.
The trainings and the tools run in this process (conftest.call_tool)."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from conftest import call_tool
from slurm.job import TrainJob

pytestmark = pytest.mark.timeout(300)

TINY = ["data.backend=torch", "data.num_threads=0", "optim.iters=4", "train.ckpt_every=2", "train.mu=2",
        "train.log_every=2"]


def _train(run_dir: Path, root: Path, *extra: str) -> None:
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", f"data.root={root}",  # in this process
                    *TINY, *extra, f"train.run_dir={run_dir}")
    assert res.returncode == 0, res.stderr[-2000:]


def _check(run_dir: Path, world: int) -> tuple[int, dict[str, str]]:
    """Exit code and {check name: printed line} of the pre-flight at `world` ranks (in this process:
    tests/cluster/test_submit_preflight.py runs the --check command line)."""
    res = call_tool("tools/train.py", "--cfg", str(run_dir / "config.yaml"), "--check",
                    "--world-size", str(world), f"train.run_dir={run_dir}")
    lines = {ln[6:].split(":")[0]: ln for ln in res.stdout.splitlines() if ln[:4] in ("ok  ", "FAIL")}
    assert "resume" in lines, res.stdout + res.stderr
    return res.returncode, lines


@pytest.fixture(scope="module")
def per_gpu_run(digits_root, tmp_path_factory) -> Path:
    """4 steps at 4 labeled images per rank on 1 rank, the reference batch being 4 (k = 1)."""
    run_dir = tmp_path_factory.mktemp("elastic") / "per_gpu"
    _train(run_dir, digits_root, "train.scale=per_gpu", "train.batch_per_gpu=4", "optim.base_batch=4")
    return run_dir


@pytest.mark.slow
def test_elastic_preflight_describes_a_new_world_size(per_gpu_run):
    rc, lines = _check(per_gpu_run, 2)
    assert rc == 0, lines
    # 1 -> 2 ranks at 4 per rank: global batch 4 -> 8, lr 0.05 x 4/4 -> 0.05 x 8/4, the 4 steps of 4
    # images are 2 steps of 8, and optim.iters=4 at k=1 is 2 steps at k=2
    # (the run is finished: the line says so too, and tools/submit.py would submit nothing)
    finished = "; the run is finished (iteration 4 of 4): a job would only report its result"
    assert lines["resume"] == (
        "ok    resume: resumes from ckpt_000000004.pt (iteration 4, written by 1 rank): elastic resume "
        "1 -> 2 ranks: 4 -> 8 labeled images per step, lr 0.05 -> 0.1, iteration 4 -> 2 of 2" + finished)
    rc, lines = _check(per_gpu_run, 1)
    assert rc == 0 and lines["resume"].endswith("written by 1 rank): same world size, exact resume" + finished)


@pytest.mark.slow
def test_elastic_preflight_refuses_a_world_size_the_recipe_cannot_take(digits_root, tmp_path):
    """train.scale=fixed_global, batch 4: 3 ranks cannot share it; on 4 ranks the BN groups of one
    rank (1 labeled + 2 unlabeled images) fall below train.min_bn_images=6; 2 ranks are fine."""
    run_dir = tmp_path / "fixed"
    _train(run_dir, digits_root, "train.batch_size=4", "train.bn_group_ranks=1", "train.min_bn_images=6")
    rc, lines = _check(run_dir, 3)
    assert rc == 1
    assert lines["resume"] == "FAIL  resume: train.batch_size=4 does not divide by the world size 3"
    rc, lines = _check(run_dir, 4)
    assert rc == 1 and lines["resume"].startswith(
        "FAIL  resume: BN groups would see 3 images (1 rank(s) x 3) at world size 4, fewer than "
        "train.min_bn_images=6"), lines
    rc, lines = _check(run_dir, 2)
    assert rc == 0, lines
    assert lines["resume"].endswith("elastic resume 1 -> 2 ranks: 4 -> 4 labeled images per step, "
                                     "lr 0.0125 -> 0.0125, iteration 4 -> 4 of 4; the run is finished "
                                     "(iteration 4 of 4): a job would only report its result"), lines

    # a longer schedule: refused without the flag; with it the job itself accepts it and trains on
    no_flag = call_tool("tools/submit.py", "--resume", str(run_dir), "--local", "--gpus-per-node", "0", "optim.iters=6")
    assert no_flag.returncode == 2 and "--allow-config-change" in no_flag.stderr, no_flag.stderr[-2000:]
    flag = call_tool("tools/submit.py", "--resume", str(run_dir), "--local", "--gpus-per-node", "0",
                     "--allow-config-change", "optim.iters=6")
    assert flag.returncode == 0, flag.stderr[-2000:]
    assert "finished at iteration 6" in flag.stdout, flag.stdout[-2000:]


def test_elastic_train_job_keeps_allow_config_change_through_pickling():
    """The submitted callable is pickled into the job and again for every requeue."""
    job = pickle.loads(pickle.dumps(TrainJob("c.yaml", ["optim.iters=6"], "/r", allow_config_change=True)))
    assert job.allow_config_change and "allow_config_change=True" in repr(job)
    old = TrainJob("c.yaml", [], "/r")
    state = old.__getstate__()
    del state["allow_config_change"]  # a job pickled by an earlier version
    fresh = TrainJob.__new__(TrainJob)
    fresh.__setstate__(state)
    assert fresh.allow_config_change is False
