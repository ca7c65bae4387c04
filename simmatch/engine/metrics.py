"""Metrics: accumulated on the device, reduced every `log_every` steps, written as JSON lines."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch

from simmatch import distributed as dist


class MetricWindow:
    """Sums detached scalar tensors without touching the host until `reduce()`."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._steps = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            v = v.detach().float()
            self._sums[k] = self._sums[k] + v if k in self._sums else v.clone()
        self._steps += 1

    def reduce(self) -> dict[str, float]:
        """Means over the window and over ranks (a collective), then reset."""
        if not self._sums:
            return {}
        keys = sorted(self._sums)
        stacked = torch.stack([self._sums[k] for k in keys]) / self._steps
        stacked = dist.all_reduce_mean(stacked).cpu()
        self._sums, self._steps = {}, 0
        return {k: float(v) for k, v in zip(keys, stacked)}


class MetricsFile:
    """Appends one JSON object per line (rank 0 only); `pandas.read_json(lines=True)` reads it.

    Every record gets `time` (seconds since the epoch) and goes to the trackers too
    (TensorBoard, W&B: simmatch/engine/tracking.py)."""

    def __init__(self, path: Path, enabled: bool, trackers: list | None = None):
        self.path = path
        self.enabled = enabled
        self.trackers = list(trackers or []) if enabled else []

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {**record, "time": round(time.time(), 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.write(record)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def read_metrics(run_dir: Path):
    """A run's metrics.jsonl as a pandas DataFrame (train rows and eval rows, `kind` tells)."""
    import pandas as pd

    from simmatch.errors import UserError

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"no metrics file in {run_dir} (expected {path})")
    return pd.read_json(path, lines=True)


def setup_logging(run_dir: Path, rank: int) -> logging.Logger:
    """A log file per rank; the console gets rank 0's messages only."""
    logger = logging.getLogger("simmatch")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    fh = logging.FileHandler(run_dir / f"log_rank{rank}.txt")
    fh.setFormatter(fmt)
    logger.addHandler(fh)
    if rank == 0:
        sh = logging.StreamHandler(sys.stdout)
        sh.setFormatter(fmt)
        sh.addFilter(lambda record: getattr(record, "console", True))
        logger.addHandler(sh)
    return logger


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


class Progress:
    """A one-line bar when stdout is a terminal; otherwise the caller's plain log lines suffice."""

    def __init__(self, total: int, enabled: bool):
        self.total = total
        self.enabled = enabled and sys.stdout.isatty()
        self.start = time.time()

    def update(self, iteration: int, text: str) -> None:
        if not self.enabled:
            return
        frac = iteration / max(1, self.total)
        bar = "#" * int(30 * frac)
        sys.stdout.write(f"\r[{bar:<30}] {iteration}/{self.total} {text}"[:200])
        sys.stdout.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stdout.write("\n")
