"""Unlabeled images a run goes on without: `tools/train.py ... --drop-images FILE`.

A training image that stops a run because it cannot be decoded can be dropped from the run's
frozen split instead of being restored: its path goes to RUN_DIR/splits/dropped.txt and, from
the next start on, its place in the unlabeled list is taken by the next image of the list that
is not dropped (data/splits.py `substitute_dropped`). The list keeps its length, so every data
position of the checkpoints stays valid: the continuation is deterministic, and a resume after
it is exact. Labeled images cannot be dropped (the bank's slots follow the labeled list), nor
validation images. Each drop is an event in metrics.jsonl (`kind: dropped`), which
tools/status.py shows.

FILE names each image on its own line in any of the forms the tools print: as the run's
splits/unlabeled.txt names it (relative to the training folder), as an absolute path under the
training folder (tools/check_data.py's lines, and `--write-bad FILE`), or as an error line names
an image of a shard set (`<path> (in shard ...)`). Lines starting with `#` are comments.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from simmatch.errors import DataError
from simmatch.files.atomic import atomic_write_text
from simmatch.run.lock import holder
from simmatch.run.rundir import RunDir, read_run_list, run_list_text, split_list

DROPPED = "dropped"  # RUN_DIR/splits/dropped.txt
IN_SHARD = re.compile(r"^(.*) \(in shard .*\)$")  # how an error line names an image of a shard set


def read_dropped(folder: str | Path) -> list[str]:
    """The dropped images named in a run's splits/ folder, in the order they were dropped."""
    path = split_list(folder, DROPPED)
    if not path.is_file():
        return []
    return [rel for rel in read_run_list(path) if rel]


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"--drop-images {path}: cannot be read ({exc})") from None
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]
    lines = [ln for ln in lines if ln.strip() and not ln.startswith("#")]
    if not lines:
        raise DataError(f"--drop-images {path}: no image path in it")
    return lines


def as_listed(line: str, unlabeled: set[str], train_root: Path | None) -> str | None:
    """The unlabeled list's name for a line of a drop file (see the module docstring), or None."""
    forms = [line, line.strip()]
    shard = IN_SHARD.match(line.strip())
    if shard:
        forms.append(shard.group(1))
    if train_root is not None:
        roots = dict.fromkeys([Path(os.path.abspath(train_root)), Path(train_root).resolve()])
        for form in [f for f in forms if os.path.isabs(f)]:
            for root in roots:
                try:
                    forms.append(Path(os.path.normpath(form)).relative_to(root).as_posix())
                except ValueError:
                    pass
    forms += [f.replace("\\", "/") for f in forms]
    return next((f for f in forms if f in unlabeled), None)


def drop_file_text(images: list[tuple[str, str]], others: list[tuple[str, str]], checked: str) -> str:
    """The text of a --drop-images FILE (tools/check_data.py --write-bad): each of `images` (path,
    reason) on its own line after its reason as a comment; `others`, problems that are not training
    images a run can go on without (validation images, shards, folders), as comments only."""
    lines = [f"# bad images found by tools/check_data.py {checked} ({time.strftime('%Y-%m-%d %H:%M')}):",
             "# tools/train.py --drop-images THIS_FILE goes on without them (unlabeled training images only;",
             "# a labeled or validation image must be restored)"]
    for path, reason in images:
        lines += [f"# {reason}", path]
    lines += [f"# not an image a run can drop: {where}: {reason}" for where, reason in others]
    return "".join(f"{ln}\n" for ln in lines)


def drop_images(run_dir: str | Path, file: str | Path, train_root: str | Path | None = None) -> list[str]:
    """Record the images listed in `file` as dropped from the run in `run_dir`; returns those newly
    dropped. `train_root`: the run's training folder (absolute paths under it are accepted). One
    DataError line for a run that has no frozen split yet, a labeled image, or a path the run does
    not train on (naming the forms accepted)."""
    rd = RunDir(run_dir)
    unlabeled = set(read_run_list(rd.split("unlabeled"))) if rd.split("unlabeled").is_file() else set()
    root = Path(train_root) if train_root is not None else None
    wanted = []
    for line in _lines(Path(file)):
        rel = as_listed(line, unlabeled, root)
        wanted.append(line if rel is None else rel)
    return drop(run_dir, wanted, train_root=root)


def drop(run_dir: str | Path, wanted: list[str], reason: str = "--drop-images", lock_held: bool = False,
         train_root: Path | None = None) -> list[str]:
    """`drop_images` for the paths `wanted` (as the run's lists name them); `reason` goes into the
    metrics record. `lock_held`: the caller is the training that holds the run's lock."""
    rd = RunDir(run_dir)
    who = None if lock_held else holder(rd.root)
    if who is not None:
        raise DataError(f"--drop-images: {rd} is in use by a training ({who}); stop it first")
    unlabeled_list, labeled_list = rd.split("unlabeled"), rd.split("labeled")
    if not unlabeled_list.is_file() or not rd.has_checkpoints():
        raise DataError(f"--drop-images: {rd} has no checkpoint yet, so the run starts afresh from the data "
                        f"tree: move the image out of the tree instead")
    unlabeled = set(read_run_list(unlabeled_list))
    labeled = set(read_run_list(labeled_list)) if labeled_list.is_file() else set()
    for rel in wanted:
        if rel in labeled:
            raise DataError(f"--drop-images: {rel} is a labeled image of this run ({labeled_list}): the labeled "
                            f"bank's slots follow that list, so it cannot be dropped; restore the file")
        if rel not in unlabeled:
            forms = f"relative to the training folder as {unlabeled_list} names it (e.g. {min(unlabeled)!r})" \
                if unlabeled else f"as {unlabeled_list} names it"
            if train_root is not None:
                forms += f", or as an absolute path under {train_root}"
            raise DataError(f"--drop-images: {rel} is not in this run's unlabeled list ({unlabeled_list}); "
                            f"write each image {forms}")
    already = read_dropped(rd.splits)
    new = [rel for rel in dict.fromkeys(wanted) if rel not in already]
    if new:
        atomic_write_text(split_list(rd.splits, DROPPED), run_list_text(already + new))
        record = {"kind": DROPPED, "files": new, "dropped": len(already) + len(new), "reason": reason,
                  "time": time.time()}
        with open(rd.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return new
