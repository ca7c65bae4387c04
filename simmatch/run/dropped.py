"""Unlabeled images a run goes on without: `tools/train.py ... --drop-images FILE`.

A training image that stops a run because it cannot be decoded can be dropped from the run's
frozen split instead of being restored: its path goes to RUN_DIR/splits/dropped.txt and, from
the next start on, its place in the unlabeled list is taken by the next image of the list that
is not dropped (data/splits.py `substitute_dropped`). The list keeps its length, so every data
position of the checkpoints stays valid: the continuation is deterministic, and a resume after
it is exact. Labeled images cannot be dropped (the bank's slots follow the labeled list), nor
validation images. Each drop is an event in metrics.jsonl (`kind: dropped`), which
tools/status.py shows.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from simmatch.checkpoint.atomic import atomic_write_text
from simmatch.errors import DataError
from simmatch.run.lock import holder
from simmatch.run.rundir import RunDir, split_list

DROPPED = "dropped"  # RUN_DIR/splits/dropped.txt


def read_dropped(folder: str | Path) -> list[str]:
    """The dropped images named in a run's splits/ folder, in the order they were dropped."""
    path = split_list(folder, DROPPED)
    if not path.is_file():
        return []
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def _entries(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"--drop-images {path}: cannot be read ({exc})") from None
    entries = [ln.strip().replace("\\", "/") for ln in lines if ln.strip() and not ln.startswith("#")]
    if not entries:
        raise DataError(f"--drop-images {path}: no image path in it")
    return entries


def drop_images(run_dir: str | Path, file: str | Path) -> list[str]:
    """Record the images listed in `file` (one path per line, as RUN_DIR/splits/*.txt write them)
    as dropped from the run in `run_dir`; returns those newly dropped. One DataError line for a
    run that has no frozen split yet, a labeled image, or a path the run does not train on."""
    return drop(run_dir, _entries(Path(file)))


def drop(run_dir: str | Path, wanted: list[str], reason: str = "--drop-images") -> list[str]:
    """`drop_images` for the paths `wanted`; `reason` goes into the metrics record."""
    rd = RunDir(run_dir)
    who = holder(rd.root)
    if who is not None:
        raise DataError(f"--drop-images: {rd} is in use by a training ({who}); stop it first")
    unlabeled_list, labeled_list = rd.split("unlabeled"), rd.split("labeled")
    if not unlabeled_list.is_file() or not rd.has_checkpoints():
        raise DataError(f"--drop-images: {rd} has no checkpoint yet, so the run starts afresh from the data "
                        f"tree: move the image out of the tree instead")
    unlabeled = set(ln.strip() for ln in unlabeled_list.read_text().splitlines())
    labeled = set(ln.strip() for ln in labeled_list.read_text().splitlines()) if labeled_list.is_file() else set()
    for rel in wanted:
        if rel in labeled:
            raise DataError(f"--drop-images: {rel} is a labeled image of this run ({labeled_list}): the labeled "
                            f"bank's slots follow that list, so it cannot be dropped; restore the file")
        if rel not in unlabeled:
            raise DataError(f"--drop-images: {rel} is not in this run's unlabeled list ({unlabeled_list}); "
                            f"write the paths as that file does")
    already = read_dropped(rd.splits)
    new = [rel for rel in dict.fromkeys(wanted) if rel not in already]
    if new:
        atomic_write_text(split_list(rd.splits, DROPPED), "".join(f"{rel}\n" for rel in already + new))
        record = {"kind": DROPPED, "files": new, "dropped": len(already) + len(new), "reason": reason,
                  "time": time.time()}
        with open(rd.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return new
