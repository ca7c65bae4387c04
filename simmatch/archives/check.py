"""tools/check_data.py on a folder torchvision downloaded a data set into: which archive it is, and
every split read as training would read it (files, sizes, keys, labels), each problem one line."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simmatch.archives.common import ARCHIVE_FOLDER, TITLE
from simmatch.errors import DataError


def archive_kind(root: Path | str) -> str | None:
    """The archive under `root` (a folder torchvision was given), or None: CIFAR-10, CIFAR-100 or
    STL-10 by their folder, SVHN by its train_32x32.mat."""
    root = Path(root)
    for name, folder in ARCHIVE_FOLDER.items():
        if folder and (root / folder).is_dir():
            return name
    return "svhn" if (root / "train_32x32.mat").is_file() else None


@dataclass
class ArchiveReport:
    name: str
    root: Path
    splits: dict[str, dict] = field(default_factory=dict)  # split -> images, classes, per-class counts
    problems: list[tuple[str, str]] = field(default_factory=list)  # (where, why)
    seconds: float = 0.0


def check_archive(root: Path | str, name: str | None = None) -> ArchiveReport:
    """Read every split of the archive under `root` (SVHN's extra when its file is there)."""
    from simmatch.archives import read_archive

    root = Path(root)
    name = name or archive_kind(root)
    if name is None:
        raise DataError(f"{root}: no CIFAR-10, CIFAR-100, SVHN or STL-10 archive here")
    report = ArchiveReport(name, root)
    started = time.perf_counter()
    splits = [("train", False), ("test", False)]
    splits += [("unlabeled", False)] if name == "stl10" else []
    splits += [("train", True)] if name == "svhn" and (root / "extra_32x32.mat").is_file() else []
    for split, extra in splits:
        try:
            arrays = read_archive(name, root, split, extra)
        except DataError as exc:
            report.problems.append((f"{TITLE[name]} {split}" + (" + extra" if extra else ""), str(exc)))
            continue
        counts = np.bincount(arrays.labels[arrays.labels >= 0], minlength=len(arrays.classes))
        report.splits[split + ("+extra" if extra else "")] = {
            "images": len(arrays), "classes": len(arrays.classes), "size": arrays.images.shape[1],
            "per_class": dict(zip(arrays.classes, counts.tolist())) if (arrays.labels >= 0).any() else {}}
    report.seconds = time.perf_counter() - started
    return report
