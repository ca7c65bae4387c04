"""A method of one's own in one file, with nothing under simmatch/ edited: its card (its config
section with a key that follows the global batch, its facts, its recipe line) and its class, both
registered here; then the real trainer trains it on one process and on 2 virtual ranks, resumes it
exactly, and --print-config shows its keys and its scaled value."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_same_weights, call_tool, final_state, tiny_overrides
from simmatch.fields import COUNT, NONNEG, num
from simmatch.methods.card import CARDS, CLASSES, MethodCard, Scaled, register, register_card


@dataclass
class ToyConfig:
    weight: float = num(1.0, NONNEG)  # of the consistency loss
    queue: int = num(16, COUNT)  # batch means of the teacher's confidence kept, per step of the reference batch


def _recipe(cfg: Any, m: ToyConfig, values: dict) -> tuple[list[str], dict]:
    return [f"  toy queue    {values['queue']} batch means (method.toy.queue={m.queue} per step of the "
            f"reference batch)"], {"toy_queue": values["queue"]}


def _define() -> None:
    """The toy consistency method: labeled cross-entropy plus `weight` x the mean squared
    difference between the student's softmax on the strong view and the teacher's on the weak
    view, and a FIFO of the teacher's mean confidence (state a resume must carry)."""
    from simmatch.methods.base import Method, StepTargets
    from simmatch.models import network_for

    register_card(MethodCard(
        "toy", ToyConfig, None, needs_labeled=True, needs_unlabeled=True, trains_classifier=True,
        configured_teacher=True, student_images=(1, 0, 1), teacher_images=(1, 1),
        scaled=(Scaled("queue", "steps", "confidence queue"),), recipe=_recipe))

    @register("toy")
    class Toy(Method):
        def __init__(self, student, ema_momentum: float, queue: int, weight: float, teacher: str, seed: int):
            super().__init__(student, ema_momentum, teacher, seed)
            self.weight = weight
            self.register_buffer("queue", torch.zeros(queue))
            self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

        @classmethod
        def from_config(cls, cfg, params, derived, bank_labels):
            return cls(network_for(cfg, head=False), derived.ema_momentum, derived.method_values["queue"],
                       params.weight, cls.card.teacher(cfg), cfg.train.seed)

        @torch.no_grad()
        def targets(self, labeled, unlabeled, iteration):
            outs = self.teacher_forward([torch.cat([lab["x"], unl["weak"]]) for lab, unl in zip(labeled, unlabeled)],
                                        iteration)
            b = labeled[0]["x"].shape[0]
            probs = [torch.softmax(lg[b:].float(), dim=1) for lg, _ in outs]
            confidence = torch.cat(probs).max(dim=1).values.mean()
            return StepTargets([{"p": p} for p in probs], memory=confidence)

        def student_losses(self, student, labeled, unlabeled, targets, iteration):
            b = labeled["x"].shape[0]
            logits, _ = student(torch.cat([labeled["x"], unlabeled["strong"][0]]))
            loss_x = F.cross_entropy(logits[:b].float(), labeled["y"])
            loss_c = ((torch.softmax(logits[b:].float(), dim=1) - targets["p"]) ** 2).sum(dim=1).mean()
            return {"loss": loss_x + self.weight * loss_c, "loss_x": loss_x.detach(), "loss_c": loss_c.detach()}

        @torch.no_grad()
        def after_step(self, step):
            super().after_step(step)
            self.queue[self.ptr] = step.memory
            self.ptr.copy_((self.ptr + 1) % self.queue.numel())


@pytest.fixture
def toy():
    _define()
    yield
    CARDS.pop("toy", None)
    CLASSES.pop("toy", None)


def test_its_keys_and_its_scaled_value_in_the_recipe(toy):
    res = call_tool("tools/train.py", "--cfg", "yaml/in1k_1pct.yaml", "method.name=toy", "method.toy.weight=0.5",
                    "--print-config", "--world-size", "16")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "  method       toy: weight 0.5, queue 16 (method.toy.*)" in lines
    # 16 GPUs of 8 labeled images: twice the reference batch of 64, so half the batch means
    assert "  toy queue    8 batch means (method.toy.queue=16 per step of the reference batch)" in lines
    r = json.loads(lines[-1])
    assert r["method_values"] == {"queue": 8} and r["toy_queue"] == 8 and r["method_params"]["weight"] == 0.5
    refused = call_tool("tools/train.py", "--cfg", "yaml/in1k_1pct.yaml", "method.toy.weight=0.5", "--print-config",
                        "--world-size", "8")
    assert refused.returncode == 2 and "method.toy.weight is a key of method toy, but method.name=simmatch" in \
        refused.stderr


@pytest.mark.slow  # tiny trainings in this process
def test_the_trainer_trains_it_on_virtual_ranks_and_resumes_it_exactly(toy, digits_root, tmp_path):
    runs = {}
    for name, extra in (("one", {}), ("virtual", {"train.virtual_world_size": 2})):
        run_dir = tmp_path / name
        overrides = tiny_overrides(digits_root, run_dir, **{"method.name": "toy", "optim.iters": 6,
                                                            "train.ckpt_every": 3, "train.keep_ckpts": 5,
                                                            "data.val_batch": 512, **extra})
        res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", *overrides)
        assert res.returncode == 0, res.stderr[-3000:]
        state = final_state(run_dir)
        assert state["config"]["method"] == {"name": "toy", "toy": {"weight": 1.0, "queue": 16}}
        assert state["method"]["ptr"] == 6 and (state["method"]["queue"][:6] > 0).all()  # six steps were pushed
        records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in records if r["kind"] == "train"] == list(range(1, 7))
        assert all("loss_c" in r for r in records if r["kind"] == "train")
        runs[name] = (run_dir, overrides)
    assert "1 process running 2 virtual ranks" in (tmp_path / "virtual" / "log_rank0.txt").read_text()
    # the resume: a copy of the virtual run back at its checkpoint of step 3 goes on to step 6
    run_dir, overrides = runs["virtual"]
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed, symlinks=True)
    for name in ("ckpt_000000006.pt", "ckpt_000000006.pt.sha256"):
        (resumed / "checkpoints" / name).unlink()
    (resumed / "checkpoints" / "last.pt").unlink()
    config = resumed / "config.yaml"
    config.write_text(config.read_text().replace(f"run_dir: {run_dir}\n", f"run_dir: {resumed}\n"))
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml",
                    *[o.replace(str(run_dir), str(resumed)) for o in overrides])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in (resumed / "log_rank0.txt").read_text()
    assert_same_weights(final_state(resumed), final_state(run_dir))
    assert torch.equal(final_state(resumed)["method"]["queue"], final_state(run_dir)["method"]["queue"])
