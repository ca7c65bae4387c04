"""An ImageNet-style folder as lists of paths: `root/<class>/<image>`, classes the sorted folder
names, every image named by its path relative to `root`. What a split list can hold is decided
here too (one UTF-8 path per line). No torch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from simmatch.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def name_problem(name: str) -> str | None:
    """Why a file or folder name cannot stand on a line of a split list (RUN_DIR/splits/*.txt, UTF-8,
    one path per line), or None: bytes that are not UTF-8, or a line break."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not UTF-8"
    if "\n" in name or "\r" in name:
        return "its name holds a line break"
    return None


def shown_name(name: str) -> str:
    """A name as it can be printed: undecodable bytes as \\xNN, line breaks as \\n / \\r."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text.replace("\n", "\\n").replace("\r", "\\r")


def refuse_bad_names(root: Path, names: list[str]) -> None:
    """One DataError line for names no split list can hold (name_problem), naming the first."""
    bad = [(n, name_problem(n)) for n in names]
    bad = [(n, why) for n, why in bad if why is not None]
    if bad:
        name, why = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"{shown_name(str(root / name))}: {why}{more}; rename it: split lists hold one UTF-8 "
                        f"path per line (tools/check_data.py lists every such name)")


@dataclass
class ImageTree:
    """An ImageNet-style folder: `root/<class>/<image>`; classes are the sorted folder names."""

    root: Path
    classes: list[str]
    files: list[str]  # relative to root, sorted
    labels: list[int]  # class index of each file

    def __len__(self) -> int:
        return len(self.files)


def scan_tree(root: str | Path, num_classes: int | None = None) -> ImageTree:
    """List `root/<class>/*` images; check the class count when `num_classes` is given."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    refuse_bad_names(root, classes)
    if not classes:
        raise DataError(f"no class folders in {root} (expected {root}/<class>/<image>)")
    if num_classes is not None and len(classes) != num_classes:
        raise DataError(f"{root} has {len(classes)} class folders but data.num_classes={num_classes}")
    files: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        names = sorted(e.name for e in os.scandir(root / cls) if e.is_file() and is_image_name(e.name))
        refuse_bad_names(root / cls, names)
        files += [f"{cls}/{n}" for n in names]
        labels += [label] * len(names)
    if not files:
        raise DataError(f"no images found under {root}")
    return ImageTree(root, classes, files, labels)
