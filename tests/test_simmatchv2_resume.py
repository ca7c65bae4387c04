"""SimMatchV2 resumed from a checkpoint written mid-run ends bit-identical to the uninterrupted
run: its labeled and unlabeled banks, ring pointer, DA mean, teacher and momenta are all in the
checkpoint. The tiny run and the resume helpers of tests/test_virtual.py, with SimMatchV2's keys
(8 steps, a checkpoint every 3, an unlabeled ring of 2 global batches that wraps 4 times)."""
from __future__ import annotations

import pytest
import torch
from test_virtual import SPE, B, _resume_copy, final, run, step_losses

V2 = ["method.name=simmatchv2", "model.norm_feat=true", "method.v2_topn=8", "method.v2_k=2"]


def check_resume(tmp_path, processes: int) -> None:
    extra = [*V2, f"optim.base_batch={B * processes}"]  # steps of this global batch: 8 of them
    whole, _ = run(tmp_path, "whole", processes, extra, 0)
    resumed = _resume_copy(whole, tmp_path / "resumed", SPE)
    run(tmp_path, "resumed", processes, extra, 0)
    a, b = final(resumed), final(whole)
    assert any(k.startswith("unlabeled.") for k in b["method"]) and a["method_name"] == "simmatchv2"
    different = [k for k in b["method"] if not torch.equal(a["method"][k], b["method"][k])]
    assert not different, different[:5]
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert [r["loss"] for r in step_losses(resumed)] == [r["loss"] for r in step_losses(whole)]
    assert int(b["method"]["unlabeled.count"]) == b["method"]["unlabeled.features"].shape[0]  # filled


def test_simmatchv2_resume_is_bit_identical_in_one_process(tmp_path):
    check_resume(tmp_path, 1)


@pytest.mark.slow
def test_simmatchv2_resume_is_bit_identical_on_three_ranks(tmp_path):
    check_resume(tmp_path, 3)
