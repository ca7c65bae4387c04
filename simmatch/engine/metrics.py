"""Metrics: accumulated on the device, reduced every `log_every` steps, written as JSON lines."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

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
    """Appends one JSON object per line (rank 0 only); `read_metrics` (or run/jsonl.py) reads it.

    Every record gets `time` (seconds since the epoch) and goes to the trackers too
    (TensorBoard, W&B: simmatch/engine/tracking.py)."""

    def __init__(self, path: Path, enabled: bool, trackers: list | None = None):
        self.path = path
        self.enabled = enabled
        self.trackers = list(trackers or []) if enabled else []
        if enabled:
            self._end_torn_line()

    def _end_torn_line(self) -> None:
        """A process killed mid-append leaves a line without its newline: end it, so that the
        first record of this process (a resume record) is not glued onto it and lost."""
        try:
            with open(self.path, "rb+") as f:
                size = f.seek(0, os.SEEK_END)
                if size:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
        except FileNotFoundError:
            pass

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
    from simmatch.run.jsonl import read_records
    from simmatch.run.rundir import RunDir

    path = RunDir(run_dir).metrics
    if not path.is_file():
        raise UserError(f"no metrics file in {run_dir} (expected {path})")
    records = read_records(path)  # a line cut by a crash or being written now is skipped
    if not any("iteration" in r for r in records):
        raise UserError(f"no metrics recorded yet in {path}")
    return pd.DataFrame(records)


def trained_history(df):
    """The records of the training that led to the newest weights, on one iteration axis.

    A resume record ends the previous process's story at its checkpoint: records it logged past
    that iteration (work lost to a crash, trained again since) are dropped. An elastic resume
    re-expresses the iteration in steps of the new global batch (simmatch/checkpoint/elastic.py), so the
    earlier records are scaled by the same ratio: every `iteration` is then in steps of the run's
    last global batch (float where the ratio is not whole) and `logged_iteration` keeps the value
    as written. Resume records themselves are not returned. Returns (frame, rescaled?).
    """
    if "kind" not in df.columns or not (df["kind"] == "resume").any():
        return df.assign(logged_iteration=df["iteration"]), False
    kept: list[tuple[int, float]] = []  # (row position, iteration in the current units)
    rescaled = False
    for pos, row in enumerate(df.itertuples(index=False)):
        if row.kind != "resume":
            kept.append((pos, float(row.iteration)))
            continue
        until = float(row.from_iteration)
        ratio = float(row.iteration) / until if until > 0 else 1.0
        rescaled = rescaled or ratio != 1.0
        kept = [(p, x * ratio) for p, x in kept if x <= until]
    out = df.iloc[[p for p, _ in kept]].copy()
    out["logged_iteration"] = out["iteration"]
    out["iteration"] = [x for _, x in kept]
    return out.reset_index(drop=True), rescaled


class _ConsoleHandler(logging.StreamHandler):
    """Console lines through tqdm.write: printed above a progress bar, never glued onto it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:
            self.handleError(record)


def setup_logging(log_file: Path, console: bool) -> logging.Logger:
    """The rank's log file (RUN_DIR/log_rank<R>.txt); the console gets rank 0's messages only."""
    logger = logging.getLogger("simmatch")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    fh = logging.FileHandler(log_file)
    fh.setFormatter(fmt)
    logger.addHandler(fh)
    if console:
        sh = _ConsoleHandler(sys.stdout)
        sh.setFormatter(fmt)
        sh.addFilter(lambda record: getattr(record, "console", True))
        logger.addHandler(sh)
    return logger


def close_logging(logger: logging.Logger) -> None:
    """Give the run's handlers back: a process that builds several trainers (tests, the self-test,
    a notebook) keeps no log file of an earlier run open, and its own logging sees the records again."""
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.propagate = True


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def on_terminal(enabled: bool = True) -> bool:
    """Progress bars only on rank 0 and only when stdout is a terminal (not in SLURM logs)."""
    return enabled and sys.stdout.isatty()


class Progress:
    """A per-step tqdm bar with ETA on rank 0 when stdout is a terminal, sized to the terminal
    (also when it is resized); otherwise nothing, and the log lines every `log_every` steps
    are the record of progress."""

    def __init__(self, total: int, enabled: bool, initial: int = 0):
        self.enabled = on_terminal(enabled)
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="it", dynamic_ncols=True,
                        file=sys.stdout, smoothing=0.05) if self.enabled else None

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def update(self, iteration: int, values: dict[str, float]) -> None:
        """Show the newest loss next to the bar (the full line goes above it, via the log)."""
        if self.bar is not None and "loss" in values:
            self.bar.set_postfix_str(f"loss {values['loss']:.4f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def eval_progress(batches: Iterator, total: int | None, desc: str, enabled: bool) -> Iterator:
    """An evaluation pass with its own transient bar (removed when the pass ends)."""
    if not on_terminal(enabled):
        return batches
    return iter(tqdm(batches, total=total, desc=desc, unit="batch", dynamic_ncols=True, leave=False,
                     file=sys.stdout))
