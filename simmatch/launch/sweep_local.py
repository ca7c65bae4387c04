"""A sweep's points on this machine, one after another, each `tools/train.py` in a process of its own.

A process per point, not one process for all: a point that crashes (or runs out of memory)
leaves the others alone, and each starts from the state a lone `tools/train.py` would (the
same run, bit for bit). The child dies with the sweep: it is sent SIGTERM when the sweep's
process ends, even by SIGKILL (Linux's parent-death signal), so it saves its checkpoint and
stops instead of training on unseen; a SIGTERM or Ctrl-C to the sweep is passed on the same way.
"""
from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from simmatch.run.sweep import Point, Sweep, final_evaluation, run_finished

TRAIN = Path(__file__).resolve().parents[2] / "tools" / "train.py"
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent (the sweep) dies, however it dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the child outlives a killed sweep
        pass


def log_path(root: Path, point: Point) -> Path:
    """Where the point's training output goes: DIR/logs/<name>_s<seed>.txt."""
    return Path(root) / "logs" / f"{point.name}_s{point.seed}.txt"


def result_text(run_dir: Path) -> str:
    record = final_evaluation(run_dir)
    shown = [f"{key} {record[key]:.2f}" for key in ("teacher_top1", "student_top1", "teacher_knn_top1")
             if isinstance(record.get(key), (int, float))]
    return ", ".join(shown) or "no evaluation"


def last_error(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    errors = [ln for ln in lines if ln.startswith("error")]
    return (errors or lines or ["no output"])[-1][:300]


def run_local(sweep: Sweep, root: Path, points: list[Point], nproc: int = 0,
              say: Callable[[str], None] = print) -> list[Point]:
    """Train `points` in order; the points that did not finish (failed, or stopped by a signal)."""
    child: dict[str, subprocess.Popen | None] = {"proc": None}
    stop: dict[str, int | None] = {"signum": None}

    def forward(signum, _frame) -> None:
        stop["signum"] = signum
        if child["proc"] is not None:
            child["proc"].send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    unfinished = []
    try:
        for i, point in enumerate(points, 1):
            if stop["signum"] is not None:
                unfinished.append(point)
                continue
            log = log_path(root, point)
            log.parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, str(TRAIN), "--cfg", sweep.cfg_of(point),
                   *(["--nproc", str(nproc)] if nproc else []), *sweep.train_overrides(point, root)]
            say(f"[{i}/{len(points)}] {point.rel}: training (output: {log})")
            started = time.time()
            with open(log, "ab") as out:
                child["proc"] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
                rc = child["proc"].wait()
                child["proc"] = None
            run_dir = root / point.rel
            if rc == 0 and run_finished(run_dir):
                took = time.time() - started
                say(f"[{i}/{len(points)}] {point.rel}: finished in {took:.0f} s, {result_text(run_dir)}")
            else:
                unfinished.append(point)
                why = "stopped by a signal" if stop["signum"] is not None else f"failed (exit {rc}): {last_error(log)}"
                say(f"[{i}/{len(points)}] {point.rel}: {why}")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return unfinished
