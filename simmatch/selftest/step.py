"""Training steps through the real engine (Trainer._step: DDP, AMP, SimMatch's targets and
bank): finite losses, and the step's speed on synthetic and on DALI-fed data."""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from simmatch.config import load_config
from simmatch.selftest.report import FAIL, PASS, SKIP, Check


@dataclass
class StepSetup:
    """The model and batch of the step: ResNet-50 bf16 on a GPU, a tiny fp32 net on a CPU."""

    arch: str
    crop: int
    classes: int
    batch: int  # labeled images per rank
    mu: int
    amp: str
    channels_last: bool
    warmup: int
    iters: int

    @property
    def what(self) -> str:
        precision = {"bf16": "bf16 autocast", "fp16": "fp16 autocast", "none": "fp32"}[self.amp]
        return f"{self.arch} {precision} at {self.crop} px, {self.batch}+{self.batch * self.mu} images per rank"


GPU_SETUP = StepSetup("resnet50", 224, 1000, 8, 5, "bf16", True, warmup=10, iters=30)
CPU_SETUP = StepSetup("resnet10", 16, 4, 2, 2, "none", False, warmup=1, iters=2)


def build_trainer(setup: StepSetup, world: int, device: torch.device, run_dir: Path,
                  data: list[str], threads: int):
    from simmatch.engine.trainer import Trainer

    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, [
        "method.name=simmatch", f"model.arch={setup.arch}", f"model.small_input={setup.crop <= 64}",
        f"data.crop_size={setup.crop}", f"data.num_classes={setup.classes}", f"data.num_threads={threads}",
        f"data.synthetic_size={max(256, setup.batch * setup.mu * world * 4)}",
        f"train.batch_size={setup.batch * world}", f"train.mu={setup.mu}", f"train.amp={setup.amp}",
        f"train.channels_last={setup.channels_last}", "optim.iters=1000000", f"train.run_dir={run_dir}",
        "train.log_every=1000000", "train.ckpt_every=1000000", *data])  # SimMatch's defaults: L_in from step 0
    trainer = Trainer(cfg, run_dir, device)
    trainer.method.train()
    return trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(trainer, setup: StepSetup) -> float:
    """Unlabeled images per second per rank over `iters` steps after `warmup` (no per-step sync)."""
    for _ in range(setup.warmup):
        trainer.step()
    _sync(trainer.device)
    t0 = time.perf_counter()
    for _ in range(setup.iters):
        trainer.step()
    _sync(trainer.device)
    return setup.batch * setup.mu * setup.iters / (time.perf_counter() - t0)


def check_step(setup: StepSetup, world: int, device: torch.device, threads: int) -> Check:
    """Two optimizer steps on synthetic data: every loss finite, the weights moved."""
    name = "train step"
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(setup, world, device, Path(tmp), ["data.backend=synthetic"], threads)
        param = next(trainer.method.student.parameters())
        before = param.detach().clone()
        losses = [trainer.step() for _ in range(2)]
        values = {k: float(v) for k, v in losses[-1].items()}
        bad = sorted(k for step in losses for k, v in step.items() if not bool(torch.isfinite(v).all()))
        moved = not torch.equal(before, param.detach())
        trainer.close()
        del trainer
    text = f"{setup.what}, {world} rank(s): loss {values['loss']:.4f}"
    if bad:
        return Check(name, FAIL, f"{text}; not finite: {', '.join(dict.fromkeys(bad))}",
                     "try train.amp=none to tell a precision problem from a broken install")
    if not moved:
        return Check(name, FAIL, f"{text}; the weights did not change", "report it with this line")
    return Check(name, PASS, f"{text}, every loss part finite, weights updated")


def check_throughput(setup: StepSetup, world: int, device: torch.device, sample_root: Path,
                     threads: int, dali_device: str) -> tuple[Check, list[str]]:
    """Step speed on synthetic tensors and fed by DALI from the sample images; returns the check
    and the DALI data overrides (for the pinned-memory report)."""
    name = "throughput"
    data = [f"data.root={sample_root}", "data.backend=dali", f"data.device={dali_device}",
            "data.labeled_per_class=4"]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(setup, world, device, Path(tmp) / "s", ["data.backend=synthetic"], threads)
        synthetic = timed_steps(trainer, setup)
        trainer.close()
        del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            return Check(name, SKIP, f"synthetic {synthetic:.1f} unlabeled img/s per rank; DALI not "
                                     "installed", "pip install -e '.[dali]'"), data
        trainer = build_trainer(setup, world, device, Path(tmp) / "d", data, threads)
        fed = timed_steps(trainer, setup)
        trainer.close()
        del trainer
    ratio = fed / synthetic if synthetic > 0 else math.nan
    text = (f"{setup.what}: synthetic {synthetic:.1f}, DALI-fed ({dali_device}, {threads} threads, "
            f"sample JPEGs) {fed:.1f} unlabeled img/s per rank = {100 * ratio:.0f}% "
            f"(ImageNet target on an H100: >= 95%, >= 3,000 img/s; this short run is indicative)")
    if not (synthetic > 0 and fed > 0 and math.isfinite(ratio)):
        return Check(name, FAIL, text, "report it with this line"), data
    return Check(name, PASS, text), data
