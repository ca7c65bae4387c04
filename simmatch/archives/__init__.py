"""The data sets of the SimMatch paper's Table 1 read exactly as torchvision's data set classes
download them, nothing converted: CIFAR-10, CIFAR-100 (cifar.py), SVHN (svhn.py) and STL-10
(stl10.py), each split as pixels with labels, class names and a stable name per image (Arrays).

`root` is the folder torchvision was given (`torchvision.datasets.CIFAR10(root, download=True)`
writes root/cifar-10-batches-py/; SVHN's .mat files sit in root itself). A missing, truncated or
foreign file is refused with one DataError line naming it. No torch here; scipy only to read SVHN.
"""
from __future__ import annotations

from pathlib import Path

from simmatch.archives import cifar, stl10, svhn
from simmatch.archives.common import ARCHIVE_FOLDER, NAMES, SPLITS, TITLE, Arrays, check_request, require_files

__all__ = ["ARCHIVE_FOLDER", "NAMES", "SPLITS", "TITLE", "Arrays", "expected_files", "read_archive", "require_archive"]


def expected_files(name: str, root: Path | str, extra: bool = False, split: str | None = None) -> list[Path]:
    """The files archive `name` needs under `root`, without reading any: those of `split`, or of every
    split when None (SVHN's extra_32x32.mat where `extra`)."""
    check_request(name, split, extra)
    root = Path(root)
    if name == "svhn":
        return svhn.expected(root, split, extra)
    if name == "stl10":
        return stl10.expected(root, split)
    return cifar.expected(name, root, split)


def read_archive(name: str, root: Path | str, split: str, extra: bool = False) -> Arrays:
    """Split `split` ("train", "test"; "unlabeled" for stl10) of archive `name` ("cifar10", "cifar100",
    "svhn", "stl10") under `root`. `extra` (svhn train only): extra_32x32.mat's images after train's."""
    check_request(name, split, extra)
    root = Path(root)
    if name == "svhn":
        return svhn.read(root, split, extra)
    if name == "stl10":
        return stl10.read(root, split)
    return cifar.read(name, root, split)


def require_archive(name: str, root: Path | str, extra: bool = False) -> None:
    """One DataError line, with the command that downloads it, when a file of archive `name` is
    missing under `root` (nothing is read: a cheap check before anything starts)."""
    require_files(name, Path(root), expected_files(name, root, extra), svhn.split_of if name == "svhn" else None)
