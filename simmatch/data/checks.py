"""Scan a data set tree for files that would break or silently shrink a run."""
from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from simmatch.data.images import image_problem
from simmatch.data.sources import FolderSource, ImageSource
from simmatch.data.splits import is_image_name, name_problem, shown_name
from simmatch.errors import DataError


@dataclass
class CheckReport:
    root: Path
    counts: dict[str, int] = field(default_factory=dict)  # class folder (relative) -> images
    problems: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    ignored: list[str] = field(default_factory=list)  # files directly under the root
    decoded: int = 0  # images decoded
    seconds: float = 0.0  # decoding time (wall clock)

    def groups(self) -> dict[str, dict[str, int]]:
        """Class counts grouped by the folder holding the class folders ("" for the root)."""
        out: dict[str, dict[str, int]] = defaultdict(dict)
        for folder, n in sorted(self.counts.items()):
            parent, _, cls = folder.rpartition("/")
            out[parent][cls] = n
        return dict(out)


def check_tree(root: str | Path, workers: int = 0, show_progress: bool = False) -> CheckReport:
    """Fully decode every image under `root`; flag corrupt, non-image files and empty folders.

    Files directly in `root` (README, label CSVs) are ignored; every other file belongs to
    the class folder that holds it. `workers` decoding threads (0: one per core).
    """
    workers = workers or os.cpu_count() or 1
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}")
    report = CheckReport(root)
    images: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        if rel_dir == ".":
            report.ignored = sorted(filenames)
            continue
        if not filenames and not dirnames:
            report.problems.append((shown_name(rel_dir), "empty folder"))
        for name in sorted(filenames):
            rel = f"{rel_dir}/{name}"
            why = name_problem(rel)
            if why is not None:  # training would refuse it: no split list can hold it
                report.problems.append((shown_name(rel), why))
            elif is_image_name(name):
                images.append(rel)
                report.counts[rel_dir] = report.counts.get(rel_dir, 0) + 1
            else:
                report.problems.append((rel, "not an image file"))
    started = time.perf_counter()
    progress = Progress(len(images)) if show_progress else None
    for rel, reason in decode_all(root, images, workers, progress=progress):
        report.problems.append((rel, f"cannot decode: {reason}"))
    report.decoded, report.seconds = len(images), time.perf_counter() - started
    report.problems += class_mismatch(report)
    report.problems.sort()
    return report


class Progress:
    """A progress line on stderr while images are decoded: rewritten in place on a terminal, a
    line per tenth otherwise (logs of batch jobs stay short)."""

    def __init__(self, total: int, what: str = "decoded", stream=None) -> None:
        self.total, self.what, self.done = total, what, 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = self.shown_at = time.perf_counter()
        self.next_tenth = 1

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.tty and (now - self.shown_at >= 0.5 or self.done == self.total):
            self.stream.write(f"\r{self.line()}" + ("\n" if self.done == self.total else ""))
            self.stream.flush()
            self.shown_at = now
        elif not self.tty and self.total and self.done * 10 >= self.next_tenth * self.total:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self.next_tenth = self.done * 10 // self.total + 1

    def line(self) -> str:
        elapsed = max(1e-9, time.perf_counter() - self.started)
        pct = 100 * self.done // max(1, self.total)
        return f"{self.what} {self.done:,}/{self.total:,} images ({pct}%), {self.done / elapsed:,.0f} images/s"


def source_problem(source: ImageSource, rel: str, fast: bool = False) -> str | None:
    """image_problem of an image of `source`; bytes that cannot be read from a shard (damaged,
    truncated, missing: a DataError naming the shard) are this image's problem too."""
    try:
        encoded = source.open(rel)
    except DataError as exc:
        return str(exc)
    return image_problem(encoded, fast=fast)


def decode_all(source: ImageSource | Path, files: list[str], workers: int, fast: bool = False,
               progress: Progress | None = None, chunksize: int = 64) -> list[tuple[str, str]]:
    """(file, reason) of every file of `files` (relative to `source`, a folder or a shard set's split)
    that does not decode, decoded in `workers` threads (decoding releases the GIL), in order."""
    if isinstance(source, Path):
        source = FolderSource(source)
    problems = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = pool.map(lambda r: source_problem(source, r, fast), files, chunksize=chunksize)
        for rel, reason in zip(files, reasons):
            if reason is not None:
                problems.append((rel, reason))
            if progress is not None:
                progress.step()
    return problems


def find_undecodable(images: list[Path] | list[tuple[ImageSource, str]], threads: int = 4) -> list[tuple[str, str]]:
    """(where, reason) of every image that does not decode: files, or (source, relative path)
    pairs (Streams.check_files). JPEGs at 1/8 scale, in `threads` threads (decoding releases the GIL)."""
    pairs = [item if isinstance(item, tuple) else (FolderSource(Path()), str(item)) for item in images]

    def problem(pair: tuple[ImageSource, str]) -> tuple[str, str | None]:
        source, rel = pair
        return source.where(rel), source_problem(source, rel, fast=True)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        found = list(pool.map(problem, pairs, chunksize=16))
    return [(where, reason) for where, reason in found if reason is not None]


def raise_if_undecodable(problems: list[tuple[str, str]], what: str, show: int = 3) -> None:
    """One line naming the first `show` bad files (0: every one), their count and the tool that
    lists them all."""
    if not problems:
        return
    problems = sorted(problems)
    show = show or len(problems)
    shown = "; ".join(f"{p} ({r})" for p, r in problems[:show])
    more = f" and {len(problems) - show} more" if len(problems) > show else ""
    raise DataError(f"{len(problems)} {what} cannot be decoded: {shown}{more} "
                    f"(tools/check_data.py DATA_ROOT lists every bad file)")


def class_mismatch(report: CheckReport) -> list[tuple[str, str]]:
    """Class folders of val/ without a train/ folder and the reverse: training refuses both."""
    groups = report.groups()
    train, val = set(groups.get("train", {})), set(groups.get("val", {}))
    if not train or not val:
        return []
    return ([(f"val/{c}", "class folder not in train/") for c in sorted(val - train)]
            + [(f"train/{c}", "class folder not in val/") for c in sorted(train - val)])
