"""End-to-end training on real JPEGs with real processes: DDP over gloo, signals, exact resume (slow
but for the ResNet-50 export, in this process)."""
import json
import os
import signal

import pandas as pd
import pytest
import torch

from conftest import (
    FOUR_RANKS,
    ROOT,
    assert_same_weights,
    call_tool,
    final_state,
    four_rank_overrides,
    run_tool,
    save_unchecked,
    stop_after_checkpoint,
    tiny_overrides,
)


@pytest.mark.slow
def test_two_process_training_and_outputs(two_rank_run):
    """What a 2-process run writes (conftest's two_rank_run: 4 steps of the per_gpu recipe)."""
    run_dir, res = two_rank_run
    assert res.returncode == 0, res.stderr[-3000:]
    assert "validation top-1: student" in res.stdout
    df = pd.read_json(run_dir / "metrics.jsonl", lines=True)
    train_rows = df[df["kind"] == "train"]
    assert list(train_rows["iteration"]) == [1, 2, 3, 4]
    assert {"loss", "loss_x", "loss_u", "loss_in", "mask", "pl_acc", "lr", "img_s"} <= set(df.columns)
    evals = df[df["kind"] == "eval"]
    assert list(evals["iteration"]) == [2, 4]
    assert evals["teacher_top1"].between(0, 100).all()
    assert (run_dir / "log_rank0.txt").is_file() and (run_dir / "log_rank1.txt").is_file()
    assert (run_dir / "config.yaml").is_file()
    assert len((run_dir / "splits" / "labeled.txt").read_text().split()) == 40
    state = final_state(run_dir)
    assert state["iteration"] == 4 and len(state["ranks"]) == 2
    assert state["splits"]["labeled"] == (run_dir / "splits" / "labeled.txt").read_text()
    # The bank is one tensor shared by all ranks: both ranks wrote rows into it.
    assert state["method"]["bank.features"].shape == (40, 16)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_four_rank_resume_is_bit_identical(four_rank_reference, digits_root, tmp_path):
    """Above 2 ranks the order in which gradients are summed matters: a run stopped by SIGUSR2
    (SLURM's warning before a time limit; SIGTERM stops the elastic, shard and SLURM runs) and
    resumed ends bit-identical to an uninterrupted one (student, teacher, bank, DA, momenta), and
    the two log windows cut by the interruption are marked partial with their step counts. On DALI;
    the same reference ends a preempted 4-node SLURM job (tests/cluster/test_slurm_four_nodes.py)."""
    iters, nproc = FOUR_RANKS["optim.iters"], 4
    ref_dir, run_dir = four_rank_reference, tmp_path / "run"

    # One window for the whole run, a checkpoint every step: the stop always cuts the window.
    args = ["tools/train.py", "--cfg", "yaml/digits.yaml", "--nproc", str(nproc),
            *four_rank_overrides(digits_root, run_dir, **{"train.log_every": iters, "train.ckpt_every": 1})]
    stopped = stop_after_checkpoint(args, run_dir, signum=signal.SIGUSR2)
    assert stopped < iters, "the signal came too late to test a resume"
    res = run_tool(*args, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in (run_dir / "log_rank0.txt").read_text()
    assert_same_weights(final_state(ref_dir), final_state(run_dir))

    rows = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert [(r["iteration"], r["steps"], r.get("partial")) for r in rows] == \
        [(stopped, stopped, True), (iters, iters - stopped, True)]
    ref_rows = [r for r in map(json.loads, (ref_dir / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"]
    assert [(r["steps"], r.get("partial")) for r in ref_rows] == [(1, None)] * iters
    # Each partial window holds the mean of its own steps (the reference logged every step).
    for row, steps in ((rows[0], ref_rows[:stopped]), (rows[1], ref_rows[stopped:])):
        assert row["loss"] == pytest.approx(sum(r["loss"] for r in steps) / len(steps), rel=1e-5)


@pytest.mark.slow
def test_export_round_trip_and_eval_tool(trained_run, tmp_path):
    import torchvision

    run_dir = trained_run(**{"optim.iters": 3, "data.val_batch": 512})  # trained in 1 process
    out = tmp_path / "export" / "resnet.pth"
    res = call_tool("tools/export.py", str(run_dir), "--which", "teacher", "--out", str(out),
                   "--head-out", str(tmp_path / "head.pth"))
    assert res.returncode == 0, res.stderr
    assert "exported logits equal the training model's" in res.stdout
    sd = torch.load(out, weights_only=True)
    from safetensors.torch import load_file

    st = load_file(str(out.with_suffix(".safetensors")))
    assert sd.keys() == st.keys() and all(torch.equal(sd[k], st[k]) for k in sd)
    # Independent check: a plain torchvision ResNet (resnet10 = BasicBlock x [1,1,1,1], small stem).
    model = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = torch.nn.Identity()
    model.load_state_dict(sd, strict=True)
    teacher = {k[len("teacher.module.backbone."):]: v for k, v in final_state(run_dir)["method"].items()
               if k.startswith("teacher.module.backbone.")}
    assert all(torch.equal(teacher[k], sd[k]) for k in sd)
    assert (tmp_path / "head.pth").is_file()

    res = call_tool("tools/eval.py", str(run_dir))  # in this process, as the export
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    df = pd.read_json(run_dir / "metrics.jsonl", lines=True)
    last_eval = df[df["kind"] == "eval"].iloc[-1]
    assert summary["teacher_top1"] == pytest.approx(last_eval["teacher_top1"])
    assert summary["student_top1"] == pytest.approx(last_eval["student_top1"])
    assert summary["count"] == 395  # every validation image once


@pytest.mark.slow  # a full ResNet-50 built, trained a step and exported: seconds, in the full suite
def test_export_resnet50_loads_into_torchvision(tmp_path):
    """A ResNet-50 training checkpoint exports into torchvision.models.resnet50() strictly."""
    import torchvision

    from simmatch.config import load_config, to_dict
    from simmatch.models import build_network
    from simmatch.models.ema import EMA

    cfg = load_config(None, ["data.num_classes=7"])
    torch.manual_seed(0)
    student = build_network("resnet50", 7)
    method = torch.nn.Module()
    method.student, method.teacher = student, EMA(student, 0.9)
    save_unchecked({"iteration": 5, "method": method.state_dict(), "config": to_dict(cfg)},
                   tmp_path / "checkpoints" / "ckpt_000000005.pt")
    res = call_tool("tools/export.py", str(tmp_path), "--which", "student", "--out", str(tmp_path / "r50.pth"))
    assert res.returncode == 0, res.stderr
    model = torchvision.models.resnet50(num_classes=7)
    model.load_state_dict(torch.load(tmp_path / "r50.pth", weights_only=True), strict=True)
    x = torch.randn(2, 3, 64, 64)
    model.eval(), student.eval()
    assert torch.equal(model(x), student(x)[0])


@pytest.mark.slow  # a training, in this process
def test_a_run_in_this_process_gives_its_logging_back(digits_root, tmp_path, caplog, monkeypatch):
    """simmatch.train.run called in-process (a notebook, a test, the self-test) leaves no handler of the
    run on the `simmatch` logger and no log file open: a later record reaches the caller's logging."""
    import logging

    from simmatch.train import run

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(ROOT)
    run_dir = tmp_path / "run"
    result = run("yaml/digits.yaml", tiny_overrides(digits_root, run_dir, **{"optim.iters": 2}))
    assert result.status == "finished" and result.iteration == 2
    assert "run " in (run_dir / "log_rank0.txt").read_text()  # the run did log to its file
    logger = logging.getLogger("simmatch")
    assert logger.handlers == [] and logger.propagate
    held = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")]
    assert not [p for p in held if p.startswith(str(run_dir))], held
    with caplog.at_level(logging.WARNING):
        logging.getLogger("simmatch.checkpoint").warning("a record after the run")
    assert "a record after the run" in caplog.text
