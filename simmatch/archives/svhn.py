"""SVHN as torchvision downloads it: root/train_32x32.mat, root/test_32x32.mat and root/extra_32x32.mat,
MATLAB files (read with scipy.io.loadmat) holding `X` uint8 (32, 32, 3, N) (row, column, channel,
image) and `y` (N, 1), the digit of each image, 10 standing for the digit 0 (read as class 0, as
torchvision does). Classes "0".."9".

A file is read whole (loadmat has no partial read): train + extra peaks at about twice extra's 1.6 GB
of pixels while its images are copied into one array.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from simmatch.archives.common import Arrays, image_names, integer_labels, refetch, require_files, shape_text, shown
from simmatch.errors import DataError

SIDE = 32
FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}
CLASSES = [str(d) for d in range(10)]


def expected(root: Path, split: str | None, extra: bool) -> list[Path]:
    parts = [split] if split else ["train", "test"]
    if extra:
        parts.insert(parts.index("train") + 1, "extra")
    return [root / FILES[p] for p in parts]


def split_of(path: Path) -> str:
    """torchvision's split name of an SVHN file (the `split=` of its download command)."""
    return {f: s for s, f in FILES.items()}.get(path.name, "train")


def load_mat(root: Path, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) of one .mat file, or one DataError line."""
    try:
        import scipy.io
    except ImportError:
        raise DataError(f"reading {shown(path)} needs scipy (pip install scipy)") from None
    split = split_of(path)
    try:
        mat = scipy.io.loadmat(str(path), variable_names=("X", "y"))
    except OSError as exc:
        if exc.strerror:
            raise DataError(f"{shown(path)} cannot be read ({exc.strerror})") from None
        raise DataError(f"{shown(path)} does not load as a MATLAB file (truncated or damaged)"
                        f"{refetch('svhn', root, split)}") from None
    except NotImplementedError:
        raise DataError(f"{shown(path)} is a MATLAB v7.3 (HDF5) file; SVHN's files are MATLAB v5 files: not the "
                        f"file torchvision downloads{refetch('svhn', root, split)}") from None
    except MemoryError:
        raise
    except Exception:
        raise DataError(f"{shown(path)} does not load as a MATLAB file (truncated or damaged)"
                        f"{refetch('svhn', root, split)}") from None
    for key in ("X", "y"):
        if key not in mat:
            raise DataError(f"{shown(path)} holds no variable {key}: not an SVHN file")
    x, y = mat["X"], mat["y"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (SIDE, SIDE, 3):
        what = f"{shape_text(x.shape)} {x.dtype.name}" if isinstance(x, np.ndarray) else "not an array"
        raise DataError(f"{shown(path)}: its X is {what}, not ({SIDE}, {SIDE}, 3, N) uint8: not an SVHN file")
    count = x.shape[3]
    if not isinstance(y, np.ndarray) or y.ndim not in (1, 2) or (y.ndim == 2 and 1 not in y.shape):
        what = shape_text(y.shape) if isinstance(y, np.ndarray) else "not an array"
        raise DataError(f"{shown(path)}: its y is {what}, not (N, 1): not an SVHN file")
    labels = integer_labels(y.reshape(-1), path, count, "labels (y)")
    bad = (labels < 1) | (labels > 10)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DataError(f"{shown(path)}: label {int(labels[first])} (of image {first}) is outside 1..10 (10 is the "
                        f"digit 0): not an SVHN file")
    labels[labels == 10] = 0
    return x, labels


def read(root: Path, split: str, extra: bool) -> Arrays:
    """Split `train` (with extra_32x32.mat's images after train's when `extra`) or `test`."""
    paths = expected(root, split, extra)
    require_files("svhn", root, paths, svhn_split_of=split_of)
    loaded = [load_mat(root, p) for p in paths[:1]]
    if extra:
        loaded.append(load_mat(root, paths[1]))
    count = sum(x.shape[3] for x, _ in loaded)
    images = np.empty((count, SIDE, SIDE, 3), dtype=np.uint8)
    start, names = 0, []
    for path, (x, _) in zip(paths, loaded):
        n = x.shape[3]
        images[start:start + n] = x.transpose(3, 0, 1, 2)
        names += image_names("extra" if path.name == FILES["extra"] else split, n)
        start += n
    labels = np.concatenate([y for _, y in loaded])
    return Arrays(images=images, labels=labels, classes=list(CLASSES), files=[str(p) for p in paths], names=names)
