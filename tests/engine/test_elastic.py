"""Elastic resume: a run continued on another number of ranks.

Stream level (every backend, in one process, ranks emulated): the epoch goes on from the first
image no rank has read, every image of the epoch once (then the last batch's padding); a later
same-layout resume stays bit-exact. End to end (real gloo ranks): 1 -> 2 and 2 -> 3 ranks under
train.scale=per_gpu, where the global batch, the lr and the DA length change with the world size:
the replicated state loads exactly, the learning rate stays the same function of images seen
(2 -> 1 through SLURM and in one local process: tests/cluster/test_elastic_slurm.py).
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import call_tool, final_state, run_tool, stop_after_checkpoint, tiny_overrides
from conftest_data import data_cfg, streams_for

CPU = torch.device("cpu")
K = 40  # labeled images of data_cfg's split


def _streams(root: Path, backend: str, rank: int, world: int):
    extra = ["data.num_threads=0"] if backend == "torch" else []
    cfg = data_cfg(root, "train.scale=per_gpu", "train.batch_per_gpu=3", "data.synthetic_size=40",
                   *extra, backend=backend)
    return streams_for(cfg, rank, world, CPU)


def _draw(streams: list, n: int) -> list[list[int]]:
    """n steps of every rank's labeled stream: the indices of each step, rank after rank."""
    return [[i for s in streams for i in next(s.labeled)["index"].tolist()] for _ in range(n)]


@pytest.mark.parametrize("backend", ["dali", "torch", "synthetic"])
def test_elastic_streams_finish_the_epoch_once(digits_root, backend):
    """2 ranks read 3 steps (18 images), 3 ranks 1 step (9 more), 1 rank the rest: every labeled
    image of the epoch exactly once before any repeat, the padding only in the epoch's last batch;
    then a whole new epoch. A same-layout resume after the elastic ones continues bit-identically."""
    two = [_streams(digits_root, backend, r, 2) for r in range(2)]
    seen = sum(_draw(two, 3), [])
    saved = two[1].labeled.state_dict()  # any rank's position: they read in lockstep
    three = [_streams(digits_root, backend, r, 3) for r in range(3)]
    for s in three:
        s.labeled.load_state_dict(saved)
    seen += sum(_draw(three, 1), [])
    saved = three[0].labeled.state_dict()
    one = [_streams(digits_root, backend, 0, 1)]
    one[0].labeled.load_state_dict(saved)
    left = K - len(seen)  # 13: five batches of 3, the last two images padding
    tail = sum(_draw(one, math.ceil(left / 3)), [])
    epoch = seen + tail[:left]
    assert sorted(epoch) == list(range(K)), "an image of the epoch was skipped or read twice"
    assert len(tail) - left == 2 and set(tail[left:]) <= set(epoch)
    nxt = sum(_draw(one, math.ceil(K / 3)), [])  # the next epoch is whole again
    assert sorted(nxt[:K]) == list(range(K))

    state = one[0].labeled.state_dict()
    ahead = [next(one[0].labeled) for _ in range(2)]
    again = _streams(digits_root, backend, 0, 1)
    again.labeled.load_state_dict(state)
    for want in ahead:
        got = next(again.labeled)
        assert torch.equal(got["index"], want["index"]) and torch.equal(got["x"], want["x"])
    for s in two + three + one + [again]:
        s.close()


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("n,b1,w1,steps,b2,w2", [(103, 4, 2, 5, 3, 3), (103, 5, 3, 4, 7, 1), (50, 2, 4, 5, 1, 3),
                                                  (50, 3, 1, 15, 2, 2), (37, 3, 3, 3, 5, 2), (20, 2, 2, 4, 3, 2)])
def test_elastic_plan_reads_each_item_of_the_epoch_once(n, b1, w1, steps, b2, w2, drop):
    """The items of an epoch read by w1 ranks for some steps, then by w2 ranks to the epoch's end:
    together each item once (pad: all of them, then padding; drop: whole batches only, what is
    left short of one dropped), and the next epoch is a whole permutation in the new layout."""
    from simmatch.data.sharding import ShardPlan

    def rows(plans: list, epoch: int) -> list[list[int]]:
        per_rank = [p.rank_order(epoch).reshape(-1, p.batch_size) for p in plans]
        return [[int(i) for r in per_rank for i in r[k]] for k in range(len(per_rank[0]))]

    before = [ShardPlan(n, b1, r, w1, 7, 2, drop) for r in range(w1)]
    seen = sum(rows(before, 0)[:steps], [])
    assert len(seen) == steps * b1 * w1 < n
    after = [p for r in range(w2) for p in [ShardPlan(n, b2, r, w2, 7, 2, drop, 0, len(seen))]]
    tail = sum(rows(after, 0), [])
    left, step = n - len(seen), b2 * w2
    if drop:
        assert len(tail) == left // step * step
        assert len(set(seen + tail)) == len(seen) + len(tail)
    else:
        assert len(tail) == -(-left // step) * step
        assert sorted(seen + tail[:left]) == list(range(n))
    following = sum(rows(after, 1), [])
    assert len(set(following)) == len(following) if drop else sorted(set(following)) == list(range(n))


# ---------------------------------------------------------------------------------- end to end
PER_GPU = {"train.scale": "per_gpu", "train.batch_per_gpu": 4, "optim.base_batch": 16, "optim.lr": 0.05,
           "optim.iters": 6, "train.ckpt_every": 1, "train.log_every": 1, "method.simmatch.da_len": 32}


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _lr_of_images(images: float, total_images: float, world: int) -> float:
    """The cosine of the per_gpu recipe as a function of images seen (no warm-up):
    base lr 0.05 x (4 x world) / 16."""
    return 0.05 * 4 * world / 16 * 0.5 * (1 + math.cos(math.pi * images / total_images))


def _cmd(nproc: int, overrides: list[str]) -> list[str]:
    return [sys.executable, "tools/train.py", "--cfg", "yaml/digits.yaml",
            *(["--nproc", str(nproc)] if nproc > 1 else []),
            *overrides]


def _elastic(digits_root: Path, tmp_path: Path, before: int, after: int, backend: str,
             **more) -> tuple[Path, int, dict]:
    run_dir = tmp_path / "run"
    extra = {"data.backend": backend, "data.num_threads": 1 if backend == "dali" else 0, **more}
    overrides = tiny_overrides(digits_root, run_dir, **PER_GPU, **extra)
    stopped = stop_after_checkpoint(_cmd(before, overrides)[1:], run_dir)
    saved = final_state(run_dir)
    shutil.copytree(run_dir, tmp_path / "stopped")
    # one process: in this one
    res = call_tool(*_cmd(1, overrides)[1:]) if after == 1 else run_tool(*_cmd(after, overrides)[1:], timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir, stopped, saved


def _check_schedule(run_dir: Path, before: int, after: int, stopped: int) -> None:
    # 6 steps of the reference batch 16 = 96 images: 12 steps of 8 on 2 ranks, 24 of 4 on 1,
    # 8 of 12 on 3 (where an iteration of 8 images is re-expressed to the nearest step of 12)
    total_images = 6 * 16
    rows = _records(run_dir)
    resumed_at = round(stopped * 4 * before / (4 * after))
    assert [r for r in rows if r["kind"] == "resume"] == [
        {"kind": "resume", "iteration": resumed_at, "world_size": after, "processes": after,
         "from_iteration": stopped, "from_world_size": before, "from_processes": before,
         "time": pytest.approx(time.time(), abs=3600)}]
    train = [r for r in rows if r["kind"] == "train"]
    for r in train:
        world = r["world_size"]
        # a record's lr is the one of its last step, which began after iteration - 1 steps
        assert r["lr"] == pytest.approx(_lr_of_images((r["iteration"] - 1) * 4 * world, total_images, world),
                                        rel=1e-9, abs=1e-12), r
    cut = next(i for i, r in enumerate(rows) if r["kind"] == "resume")
    assert {r["world_size"] for r in rows[:cut] if r["kind"] == "train"} <= {before}
    assert {r["world_size"] for r in rows[cut:] if r["kind"] == "train"} == {after}
    assert train[-1]["iteration"] == total_images // (4 * after)
    assert final_state(run_dir)["world_history"] == [{"world_size": before, "iteration": 0},
                                                     {"world_size": after, "iteration": resumed_at}]


def _fifo_reference(rows: torch.Tensor, ptr: int, count: int, length: int) -> tuple[torch.Tensor, int, int]:
    """A ring buffer's newest rows, oldest first, in a zeroed buffer of `length` rows (a loop)."""
    order = []
    for age in range(count):  # age 0: the oldest filled row
        order.append(rows[(ptr - count + age) % rows.shape[0]])
    order = order[-length:]
    out = torch.zeros(length, rows.shape[1])
    for i, row in enumerate(order):
        out[i] = row
    return out, len(order) % length, len(order)


def _check_loaded_state(stopped_dir: Path, saved: dict, stopped: int) -> None:
    """The 2-rank checkpoint loaded by one process: weights, teacher, bank, optimizer momenta and
    scaler exactly; the DA queue (64 means of 8 images -> 128 of 4) holds the same means, oldest
    first; the data continue where both ranks together had stopped; the iteration doubles."""
    from simmatch.config import load_config
    from simmatch.engine.trainer import Trainer

    cfg = load_config(str(stopped_dir / "config.yaml"), [f"train.run_dir={stopped_dir}"])
    trainer = Trainer(cfg, stopped_dir, CPU)
    assert trainer.resume()
    assert trainer.iteration == 2 * stopped
    state = trainer.method.state_dict()
    da = {k for k in state if k.startswith("da.")}
    assert da == {"da.queue", "da.ptr", "da.count"}
    different = [k for k in state if k not in da and not torch.equal(state[k], saved["method"][k])]
    assert not different, f"{len(different)} tensors differ after an elastic load, e.g. {different[:3]}"
    want = _fifo_reference(saved["method"]["da.queue"], int(saved["method"]["da.ptr"]),
                           int(saved["method"]["da.count"]), 128)
    assert state["da.queue"].shape == (128, 10) and torch.equal(state["da.queue"], want[0])
    assert (int(state["da.ptr"]), int(state["da.count"])) == want[1:]
    assert state["da.queue"].sum(0).div(want[2]).allclose(
        saved["method"]["da.queue"].sum(0) / int(saved["method"]["da.count"]))  # the same p_model
    opt = trainer.optimizer.state_dict()["state"]
    assert all(torch.equal(opt[i]["momentum_buffer"], saved["optimizer"]["state"][i]["momentum_buffer"])
               for i in saved["optimizer"]["state"])
    assert trainer.scaler.state_dict() == saved["scaler"]
    for name, per_step in (("labeled", 8), ("unlabeled", 16)):  # 2 ranks x 4 (x mu=2)
        pos = saved["ranks"][0][name]
        plan = getattr(trainer.streams, name).plan
        assert (plan.world_size, plan.batch_size) == (1, per_step // 2)
        assert (plan.tail_epoch, plan.tail_offset) == (pos["epoch"], pos["batch"] * per_step)
    trainer.close()


@pytest.mark.slow
def test_elastic_one_rank_to_two(digits_root, tmp_path):
    run_dir, stopped, saved = _elastic(digits_root, tmp_path, 1, 2, "torch")
    _check_schedule(run_dir, 1, 2, stopped)


@pytest.mark.slow
def test_elastic_two_ranks_to_three(digits_root, tmp_path):
    """To 3 ranks, with the authors' shuffle-BN teacher (its permutation spans every rank) and
    ReMixMatch's DA, whose 256-entry buffer (128 at the reference batch) shrinks to 171: the run
    ends on the 3-rank schedule, the buffer at its new length (its contents: the test below)."""
    run_dir, stopped, saved = _elastic(digits_root, tmp_path, 2, 3, "dali",
                                       **{"model.teacher": "ema_shuffle_bn", "method.simmatch.da_target": "labeled"})
    _check_schedule(run_dir, 2, 3, stopped)
    assert saved["method"]["da.p_model"].shape == (256, 10)
    final = final_state(run_dir)
    assert final["method"]["da.p_model"].shape == (171, 10) and final["world_size"] == 3


@pytest.mark.parametrize("old_len,new_len", [(256, 171), (64, 128), (32, 32)])
def test_elastic_da_queues_keep_their_newest_means(old_len, new_len):
    """Both DA modules loaded from a state of another length: SimMatch's queue keeps its newest
    `count` means oldest first (zeros after), ReMixMatch's buffer its newest entries (every entry
    counts, uniform ones included) and uniform rows after; ptr points at the next row to replace."""
    from simmatch.methods.alignment import DistributionAlignment, ReMixMatchAlignment

    gen = torch.Generator().manual_seed(old_len + new_len)
    for count in (old_len // 3, old_len):  # part filled, wrapped around
        old = DistributionAlignment(10, old_len)
        for _ in range(count + old_len // 2 if count == old_len else count):
            old(torch.softmax(torch.randn(4, 10, generator=gen), 1))
        new = DistributionAlignment(10, new_len)
        new.load_state_dict(old.state_dict())
        if new_len == old_len:  # the same length loads as it is
            assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), old.state_dict().values()))
            continue
        rows, ptr, filled = _fifo_reference(old.queue, int(old.ptr), int(old.count), new_len)
        assert torch.equal(new.queue, rows) and (int(new.ptr), int(new.count)) == (ptr, filled)

    old = ReMixMatchAlignment(10, old_len)
    for _ in range(old_len // 2 + 3):
        old(torch.softmax(torch.randn(4, 10, generator=gen), 1), torch.randint(0, 10, (4,), generator=gen))
    new = ReMixMatchAlignment(10, new_len)
    new.load_state_dict(old.state_dict())
    if new_len == old_len:
        assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), old.state_dict().values()))
        return
    chronological = [old.p_model[(int(old.ptr) + i) % old_len] for i in range(old_len)]  # oldest first
    kept = chronological[-new_len:]
    want = torch.full((new_len, 10), 0.1)
    for i, row in enumerate(kept):
        want[i] = row
    assert torch.equal(new.p_model, want) and int(new.ptr) == len(kept) % new_len
    assert torch.equal(new.p_data, old.p_data)
