"""SimMatchV2 stopped mid-run and resumed ends bit-identical to the uninterrupted run: its labeled
and unlabeled banks, ring pointer, DA mean, teacher and momenta are all in the checkpoint.

Two ways in: a checkpoint written mid-run (the tiny in-process run of tests/engine/test_virtual.py, an
unlabeled ring of 2 global batches that wraps 4 times in 8 steps), and `tools/train.py --cfg
yaml/digits_v2.yaml` with multi-crop and the authors' shuffle-BN teacher: stopped by SIGTERM after a
checkpoint and started again in one process. (Its multi-rank arithmetic, the ring's all-gathered
rows included, is tests/authors/test_authors_v2.py's at 3 gloo ranks; a multi-rank resume, the engine's
and the same for every method, tests/engine/test_train.py's at 4.)"""
from __future__ import annotations

import pytest
import torch
from test_virtual import SPE, B, final, run, step_losses

from conftest import (
    assert_same_weights,
    call_tool,
    final_state,
    resume_copy,
    stop_after_checkpoint,
    tiny_overrides,
)

V2 = ["method.name=simmatchv2", "model.norm_feat=true", "method.simmatchv2.topn=8", "method.simmatchv2.k=2"]
MULTICROP = {"data.num_strong": 2, "data.strong_sizes": "[16,8]", "data.strong_min_scales": "[0.14,0.05]",
             "data.strong_max_scales": "[1.0,0.429]", "data.saturation": 0.2, "data.solarize_prob": 0.1}


def test_simmatchv2_resume_from_a_mid_run_checkpoint_is_bit_identical(tmp_path):
    extra = [*V2, f"optim.base_batch={B}"]  # steps of this global batch: 8 of them
    whole, _ = run(tmp_path, "whole", 1, extra, 0)
    resumed = resume_copy(whole, tmp_path / "resumed", SPE)
    run(tmp_path, "resumed", 1, extra, 0)
    a, b = final(resumed), final(whole)
    assert any(k.startswith("unlabeled.") for k in b["method"]) and a["method_name"] == "simmatchv2"
    assert_same_weights(a, b)
    assert [r["loss"] for r in step_losses(resumed)] == [r["loss"] for r in step_losses(whole)]
    assert int(b["method"]["unlabeled.count"]) == b["method"]["unlabeled.features"].shape[0]  # filled


def digits_v2(root, run_dir, processes: int, iters: int = 4) -> list[str]:
    """`iters` steps of (8 labeled + 16 unlabeled in 2 crops of 16 / 8 px) per rank, a checkpoint
    every step, a ring of 2 global batches (it wraps), the authors' teacher."""
    extra = {"optim.iters": iters, "train.ckpt_every": 1, "train.batch_size": 8 * processes,
             "optim.base_batch": 8 * processes, "method.simmatchv2.k": 2, "method.simmatchv2.topn": 8,
             "model.teacher": "ema_shuffle_bn", "data.check_images": False, "data.val_batch": 512, **MULTICROP}
    return ["tools/train.py", "--cfg", "yaml/digits_v2.yaml", "--nproc", str(processes),
            *tiny_overrides(root, run_dir, **extra)]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_simmatchv2_sigterm_then_resume_is_bit_identical(digits_root, tmp_path):
    """One process: the reference and the resume in this process, the stopped run a subprocess (10
    steps: time for the signal to come before the last)."""
    ref_dir, run_dir, iters = tmp_path / "ref", tmp_path / "run", 10
    ref = call_tool(*digits_v2(digits_root, ref_dir, 1, iters))
    assert ref.returncode == 0, ref.stderr[-3000:]
    args = digits_v2(digits_root, run_dir, 1, iters)
    assert stop_after_checkpoint(args, run_dir) < iters, "the signal came too late to test a resume"
    _resume_and_compare(args, run_dir, ref_dir, call_tool, 1)


def _resume_and_compare(args: list[str], run_dir, ref_dir, tool, processes: int) -> None:
    res = tool(*args, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in (run_dir / "log_rank0.txt").read_text()
    a, b = final_state(run_dir), final_state(ref_dir)
    assert_same_weights(a, b)
    assert int(b["method"]["unlabeled.count"]) == b["method"]["unlabeled.features"].shape[0] == 2 * 16 * processes
    assert not torch.equal(b["method"]["unlabeled.probs"], torch.zeros_like(b["method"]["unlabeled.probs"]))
