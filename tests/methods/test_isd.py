"""ISD: the loss against a loop, the queue across two gloo ranks, training, exact resume, init_from."""
from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_same_weights, call_tool, final_state, tiny_overrides
from simmatch.methods.isd.method import isd_loss
from simmatch.methods.queue import EmbeddingQueue


def loop_isd(q, k, queue, t_s, t_t) -> float:
    total = 0.0
    for i in range(q.shape[0]):
        s_logits = [float(q[i] @ queue[j]) / t_s for j in range(queue.shape[0])]
        t_logits = [float(k[i] @ queue[j]) / t_t for j in range(queue.shape[0])]
        zs = math.log(sum(math.exp(v - max(s_logits)) for v in s_logits)) + max(s_logits)
        zt = math.log(sum(math.exp(v - max(t_logits)) for v in t_logits)) + max(t_logits)
        for a, b in zip(s_logits, t_logits):
            log_pt, log_ps = b - zt, a - zs
            total += math.exp(log_pt) * (log_pt - log_ps)
    return total / q.shape[0]


@pytest.mark.parametrize("b,n,d", [(1, 5, 3), (4, 17, 8), (6, 33, 16)])
def test_isd_loss_matches_loop(b, n, d):
    g = torch.Generator().manual_seed(b * 100 + n)
    q, k, queue = (F.normalize(torch.randn(m, d, generator=g), dim=1) for m in (b, b, n))
    got = float(isd_loss(q, k, queue, 0.1, 0.01))
    assert got == pytest.approx(loop_isd(q.double(), k.double(), queue.double(), 0.1, 0.01), rel=1e-4, abs=1e-5)
    assert float(isd_loss(k, k, queue, 0.1, 0.1)) == pytest.approx(0.0, abs=1e-6)  # same distributions


def _push_two_ranks(rank: int, world: int) -> dict:
    queue = EmbeddingQueue(size=10, dim=4, seed=7)
    start = queue.features.clone()
    for step in range(3):  # 3 steps x 2 ranks x 2 rows = 12 rows: wraps around a queue of 10
        rows = torch.full((2, 4), float(100 * step + 10 * rank + 1))
        rows[1] += 0.5
        queue.push(rows)
    return {"features": queue.features, "ptr": int(queue.ptr), "start": start}


def test_queue_all_gathers_across_two_ranks(gloo, tmp_path):
    out = gloo(_push_two_ranks, 2, tmp_path)
    assert torch.equal(out[0]["features"], out[1]["features"]) and out[0]["ptr"] == out[1]["ptr"] == 2
    # the expected queue by hand: rank 0's rows, then rank 1's, step after step, FIFO over 10 slots
    written = []
    for step in range(3):
        for rank in range(2):
            written += [100 * step + 10 * rank + 1, 100 * step + 10 * rank + 1.5]
    expected = out[0]["start"].clone()
    for pos, value in enumerate(written):
        expected[pos % 10] = value
    assert torch.equal(out[0]["features"], expected)


@pytest.mark.slow
def test_isd_trains_resumes_exactly_and_initialises_simmatch(digits_root, tmp_path):
    run = tmp_path / "isd"
    args = ["tools/train.py", "--cfg", "yaml/digits_isd.yaml",
            *tiny_overrides(digits_root, run, **{"optim.iters": 6, "train.ckpt_every": 3,
                                                 "method.isd.queue_size": 40, "train.batch_size": 8,
                                                 "train.mu": 1, "model.proj_dim": 16})]
    res = call_tool(*args)  # the three runs train in this process (conftest.call_tool)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "validation k-NN top-1" in res.stdout
    state = final_state(run)
    queue = state["method"]["queue.features"]
    assert int(state["method"]["queue.ptr"]) == (6 * 8) % 40
    assert torch.allclose(queue.norm(dim=1), torch.ones(40), atol=1e-5)
    lines = (run / "metrics.jsonl").read_text()
    assert '"student_knn_top1"' in lines and "loss_isd" in lines

    # resume from the checkpoint of iteration 3: the queue and the weights end bit-identical
    again = tmp_path / "again"
    shutil.copytree(run, again)
    (again / "checkpoints" / "ckpt_000000006.pt").unlink()
    res = call_tool(*[a if not a.startswith("train.run_dir=") else f"train.run_dir={again}" for a in args])
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = final_state(again)
    assert resumed["iteration"] == 6
    assert_same_weights(state, resumed)

    # SimMatch initialised from the ISD run starts from its trunk (one step at lr 1e-30, below
    # float32 resolution of the weights, keeps it; lr 0 is not a valid config)
    sm = tmp_path / "sm"
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml",
                    *tiny_overrides(digits_root, sm, **{"optim.iters": 1, "optim.lr": "1.0e-30",
                                                        "model.init_from": str(run)}))
    assert res.returncode == 0, res.stderr[-3000:]
    init = final_state(sm)["method"]
    trunk = [k for k in state["method"] if k.startswith("student.backbone.")
             and not k.startswith("student.backbone.fc.") and "running_" not in k and "num_batches" not in k]
    assert len(trunk) > 10
    for key in trunk:
        assert torch.allclose(state["method"][key], init[key], rtol=0, atol=1e-20), key
        assert torch.allclose(state["method"][key], init[key.replace("student.", "teacher.module.", 1)],
                              atol=1e-6), key


def test_init_from_another_architecture_is_one_error_line(trained_run, digits_root, tmp_path):
    """A resnet10 run cannot initialise a resnet18 one: one line naming the mismatch."""
    import subprocess

    src = trained_run("src", **{"optim.iters": 2})  # a finished resnet10 run (of any method)
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml",
                    *tiny_overrides(digits_root, tmp_path / "dst", **{"model.arch": "resnet18",
                                                                       "model.init_from": str(src)}))
    assert res.returncode == 2 and isinstance(res, subprocess.CompletedProcess)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.init_from" in lines[0] and "architecture mismatch" in lines[0]
    assert not (tmp_path / "dst").exists()  # refused before the run directory was made
