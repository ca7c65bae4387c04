"""STL-10 as torchvision downloads it: root/stl10_binary/ with train_X.bin, test_X.bin and
unlabeled_X.bin (raw uint8, 3 x 96 x 96 bytes an image: the red, green and blue planes, each stored
column by column, as MATLAB writes), train_y.bin and test_y.bin (a byte per image, the class 1..10,
read as 0..9 as torchvision does) and class_names.txt (a name a line).

The train and test images are copied into ordinary arrays (138 and 221 MB). The unlabeled split
(100,000 images, 2.7 GB) is not read: its images are a read-only view of the memory-mapped file,
the pages of an image read when it is indexed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from simmatch.archives.common import (
    ARCHIVE_FOLDER,
    Arrays,
    check_range,
    file_size,
    image_names,
    refetch,
    require_files,
    shown,
)
from simmatch.errors import DataError

SIDE = 96
IMAGE_BYTES = 3 * SIDE * SIDE
CLASS_NAMES = "class_names.txt"
FILES = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin"),
         "unlabeled": ("unlabeled_X.bin",)}
CLASS_COUNT = 10


def archive_dir(root: Path) -> Path:
    return root / ARCHIVE_FOLDER["stl10"]


def expected(root: Path, split: str | None) -> list[Path]:
    """The files of `split` (every split's when None), class_names.txt last."""
    folder = archive_dir(root)
    splits = [split] if split else ["train", "test", "unlabeled"]
    return [folder / f for s in splits for f in FILES[s]] + [folder / CLASS_NAMES]


def read_classes(root: Path, path: Path) -> list[str]:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise DataError(f"{shown(path)} cannot be read ({exc.strerror or 'an OS error'})") from None
    except UnicodeDecodeError:
        raise DataError(f"{shown(path)} is not text (UTF-8): not STL-10's class names") from None
    classes = text.splitlines()
    if len(classes) != CLASS_COUNT or not all(c.strip() for c in classes):
        raise DataError(f"{shown(path)}: it holds {len(classes)} lines, STL-10 names {CLASS_COUNT} classes, one a "
                        f"line: not STL-10's class names")
    return classes


def image_count(root: Path, path: Path) -> int:
    """How many images a *_X.bin holds, from its size; one DataError line if that is not whole."""
    size = file_size(path)
    if size == 0:
        raise DataError(f"{shown(path)} is empty (0 bytes){refetch('stl10', root)}")
    if size % IMAGE_BYTES:
        raise DataError(f"{shown(path)}: its {size} bytes are not a whole number of {SIDE}x{SIDE} RGB images "
                        f"({IMAGE_BYTES} bytes each): truncated or not an STL-10 file{refetch('stl10', root)}")
    return size // IMAGE_BYTES


def mapped_images(path: Path, count: int) -> np.ndarray:
    """The images of a *_X.bin as a read-only (N, H, W, 3) view of the mapped file, no copy.

    Stored as (N, 3, W, H) (planes column by column); torchvision reads (N, 3, H, W) as its
    transpose (0, 1, 3, 2), so HWC is the transpose (0, 3, 2, 1) of the stored array."""
    try:
        stored = np.memmap(path, dtype=np.uint8, mode="r", shape=(count, 3, SIDE, SIDE))
    except OSError as exc:
        raise DataError(f"{shown(path)} cannot be read ({exc.strerror or 'an OS error'})") from None
    return stored.view(np.ndarray).transpose(0, 3, 2, 1)


def read_labels(root: Path, path: Path, count: int, images_path: Path) -> np.ndarray:
    size = file_size(path)
    if size != count:
        raise DataError(f"{shown(path)}: it holds {size} labels but {images_path.name} holds {count} images: "
                        f"truncated or mixed up{refetch('stl10', root)}")
    try:
        labels = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    except OSError as exc:
        raise DataError(f"{shown(path)} cannot be read ({exc.strerror or 'an OS error'})") from None
    check_range(labels, 1, CLASS_COUNT, path, "STL-10")
    return labels - 1


def read(root: Path, split: str) -> Arrays:
    """Split `train`, `test` or `unlabeled` (labels -1; images a read-only view of the mapped file)."""
    paths = expected(root, split)
    require_files("stl10", root, paths)
    classes = read_classes(root, paths[-1])
    images_path = paths[0]
    count = image_count(root, images_path)
    if split == "unlabeled":
        labels = np.full(count, -1, dtype=np.int64)
        images = mapped_images(images_path, count)
    else:
        labels = read_labels(root, paths[1], count, images_path)
        images = np.ascontiguousarray(mapped_images(images_path, count))
    return Arrays(images=images, labels=labels, classes=classes, files=[str(p) for p in paths],
                  names=image_names(split, count))
