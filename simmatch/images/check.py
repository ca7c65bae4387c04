"""tools/check_data.py on a folder tree: files that would break or silently shrink a run."""
from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from simmatch.errors import DataError
from simmatch.images.decode import Progress, decode_all
from simmatch.images.tree import is_image_name, name_problem, shown_name


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


def class_mismatch(report: CheckReport) -> list[tuple[str, str]]:
    """Class folders of val/ without a train/ folder and the reverse: training refuses both."""
    groups = report.groups()
    train, val = set(groups.get("train", {})), set(groups.get("val", {}))
    if not train or not val:
        return []
    return ([(f"val/{c}", "class folder not in train/") for c in sorted(val - train)]
            + [(f"train/{c}", "class folder not in val/") for c in sorted(train - val)])
