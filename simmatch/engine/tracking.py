"""Experiment trackers fed with every metrics.jsonl record: TensorBoard and Weights & Biases.

Rank 0 only. A record's numbers become scalars named `<kind>/<key>` (train/loss, train/lr,
train/img_s, eval/teacher_top1 ...) at step `iteration`. Trackers are optional packages:
asking for one that is not installed is a ConfigError raised before the run directory is
written (`check_available`).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Protocol

from simmatch.config import Config, to_dict
from simmatch.errors import ConfigError
from simmatch.run.rundir import RunDir

SKIP = ("kind", "iteration", "time")


class Tracker(Protocol):
    def write(self, record: dict) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict) -> dict[str, float]:
    """The numeric fields of a record, named `<kind>/<key>`."""
    kind = record.get("kind", "train")
    return {f"{kind}/{k}": float(v) for k, v in record.items()
            if k not in SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)}


def check_available(cfg: Config) -> None:
    """One line, before anything is written, when a requested tracker is not installed."""
    if cfg.train.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("train.tensorboard=true needs the tensorboard package "
                          "(pip install tensorboard, or the `tensorboard` extra)")
    if cfg.train.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.wandb=true needs the wandb package (pip install wandb, or the `wandb` extra)")


class TensorBoard:
    """Event files under RUN_DIR/tensorboard (a resumed run appends a new file there)."""

    def __init__(self, run_dir: Path | RunDir):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(RunDir(run_dir).tensorboard))

    def write(self, record: dict) -> None:
        step = int(record.get("iteration", 0))
        walltime = record.get("time")
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, step, walltime=walltime)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A W&B run named after the run directory and resumed with it; WANDB_MODE=offline (or
    `wandb offline`) is honoured by wandb itself, the files go to RUN_DIR/wandb."""

    def __init__(self, cfg: Config, run_dir: Path | RunDir):
        import wandb

        run_dir = RunDir(run_dir).root
        run_id = "".join(c if c.isalnum() else "-" for c in str(run_dir.resolve()))[-64:].strip("-")
        self.run = wandb.init(project=cfg.train.wandb_project, name=run_dir.name, id=run_id, resume="allow",
                              dir=str(run_dir), config=to_dict(cfg))

    def write(self, record: dict) -> None:
        self.run.log(scalars(record), step=int(record.get("iteration", 0)))

    def close(self) -> None:
        self.run.finish()


def build_trackers(cfg: Config, run_dir: Path | RunDir) -> list[Tracker]:
    check_available(cfg)
    out: list[Tracker] = []
    if cfg.train.tensorboard:
        out.append(TensorBoard(run_dir))
    if cfg.train.wandb:
        os.environ.setdefault("WANDB_SILENT", "true")
        out.append(WandB(cfg, run_dir))
    return out
