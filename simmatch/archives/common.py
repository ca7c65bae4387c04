"""What the archive readers share: the arrays they return, the names of their images, the check
that an archive's files are there (with the command that downloads them) and the wording of a
refusal. numpy only; nothing else of the project but its errors."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simmatch.errors import ConfigError, DataError

NAMES = ("cifar10", "cifar100", "svhn", "stl10")
SPLITS = ("train", "test", "unlabeled")

# The folder under `root` that torchvision's data set class downloads the archive into
# (`torchvision.datasets.CIFAR10(root, download=True)` writes root/cifar-10-batches-py/).
ARCHIVE_FOLDER = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "svhn": "",
                  "stl10": "stl10_binary"}
TITLE = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN", "stl10": "STL-10"}
TORCHVISION_CLASS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "svhn": "SVHN", "stl10": "STL10"}


@dataclass
class Arrays:
    """One split of an archive, as pixels.

    `images`: uint8 (N, H, W, 3), HWC RGB. C-contiguous and writable, except STL-10's unlabeled
    split: there it is a read-only strided view of the memory-mapped unlabeled_X.bin (2.7 GB, read
    only where indexed; `np.ascontiguousarray(images[i:j])` gives a batch as an ordinary array).
    `labels`: int64 (N,), -1 where the archive has none (STL-10 unlabeled).
    `classes`: the class names in label order, as the archive names them.
    `files`: the archive files read, as paths (for messages).
    `names`: a name per image, unique within the data set and stable across reads (`train/00042`,
    `extra/000007`, `unlabeled/099999`: the split, then the position zero-padded to the width of
    the split's image count): a line of a split list and a relative path.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    files: list[str]
    names: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def image_names(prefix: str, count: int) -> list[str]:
    """`prefix/00000` .. for `count` images, zero-padded to the width of `count`."""
    width = len(str(count))
    return [f"{prefix}/{i:0{width}d}" for i in range(count)]


def shown(path: Path | str) -> str:
    """A path as one printable line: undecodable bytes as \\xNN, line breaks as \\n / \\r."""
    text = str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text.replace("\n", "\\n").replace("\r", "\\r")


def check_request(name: str, split: str | None, extra: bool) -> None:
    """One ConfigError line for a data set, split or `extra` no reader knows."""
    if name not in NAMES:
        raise ConfigError(f"unknown archive '{shown(name)}': expected one of {', '.join(NAMES)}")
    if split is not None and split not in SPLITS:
        raise ConfigError(f"unknown split '{shown(split)}' of {TITLE[name]}: expected one of {', '.join(SPLITS)}")
    if split == "unlabeled" and name != "stl10":
        raise ConfigError(f"{TITLE[name]} has no unlabeled split (only STL-10 has one)")
    if extra and (name != "svhn" or split not in (None, "train")):
        raise ConfigError(f"extra=True adds SVHN's extra_32x32.mat to SVHN's train split; not to "
                          f"{TITLE[name]}'s {split or 'splits'}")


def download_command(name: str, root: Path, svhn_split: str = "train") -> str:
    """The command that downloads archive `name` into `root`, as torchvision lays it out."""
    where = repr(str(root))
    split = f", split='{svhn_split}'" if name == "svhn" else ""
    return (f"python -c \"import torchvision; torchvision.datasets.{TORCHVISION_CLASS[name]}({where}{split}, "
            f"download=True)\"")


def refetch(name: str, root: Path, svhn_split: str = "train") -> str:
    """The tail of a refusal of a damaged file: torchvision downloads a file again when its checksum
    is wrong."""
    return f"; download {TITLE[name]} again with: {shown(download_command(name, root, svhn_split))}"


def require_files(name: str, root: Path, paths: Sequence[Path], svhn_split_of=None) -> None:
    """One DataError line naming the first of `paths` that is not a file, the command that downloads
    it and, where it explains the absence, what `root` holds instead."""
    missing = [p for p in paths if not p.is_file()]
    if not missing:
        return
    first = missing[0]
    svhn_split = svhn_split_of(first) if svhn_split_of else "train"
    more = f" (and {len(missing) - 1} more of its files)" if len(missing) > 1 else ""
    folder = ARCHIVE_FOLDER[name]
    if not root.is_dir():
        what = f"{TITLE[name]}: the folder {shown(root)} does not exist"
    elif first.exists():
        what = f"{TITLE[name]}: {shown(first)} is not a file{more}"
    else:
        what = f"{TITLE[name]}: {shown(first)} is missing{more}"
    if folder and root.name == folder and not (root / folder).exists():
        raise DataError(f"{what} ({shown(root)} is the archive's own folder: give the folder above it, "
                        f"{shown(root.parent)}, as the root)")
    hint = ""
    if folder and not (root / folder).exists():
        others = [n for n, f in ARCHIVE_FOLDER.items() if f and n != name and (root / f).is_dir()]
        if others:
            hint = (f" ({shown(root)} holds {ARCHIVE_FOLDER[others[0]]}/, which is {TITLE[others[0]]}: "
                    f"read it as {others[0]})")
    raise DataError(f"{what}{hint}; download it with: {shown(download_command(name, root, svhn_split))}")


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise DataError(f"{shown(path)} cannot be read ({exc.strerror or 'an OS error'})") from None


def shape_text(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(n)) for n in shape) + ")"


def integer_labels(values, path: Path, count: int, what: str) -> np.ndarray:
    """`values` as int64 (count,), or one DataError line: not whole numbers, or not `count` of them.
    Whole-valued floats pass (a MATLAB file may store labels as doubles)."""
    array = np.asarray(values)
    if array.dtype.kind == "f" and array.size and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
        array = array.astype(np.int64)
    if array.dtype.kind not in "iu" and not (array.dtype.kind == "f" and array.size == 0):
        raise DataError(f"{shown(path)}: its {what} are not whole numbers (they are of type {array.dtype.name}): "
                        f"not an archive torchvision reads")
    if array.ndim != 1:
        raise DataError(f"{shown(path)}: its {what} have shape {shape_text(array.shape)}, not one label per image")
    if len(array) != count:
        raise DataError(f"{shown(path)}: it holds {len(array)} {what} for {count} images (truncated or mixed up)")
    return array.astype(np.int64)


def check_range(labels: np.ndarray, low: int, high: int, path: Path, title: str) -> None:
    """One DataError line if a label lies outside low..high (inclusive); `title`: the data set's."""
    if labels.size == 0:
        return
    bad = (labels < low) | (labels > high)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DataError(f"{shown(path)}: label {int(labels[first])} (of image {first}) is outside {low}..{high}: "
                        f"not a {title} file")
