"""CIFAR-10 and CIFAR-100 as torchvision downloads them: root/cifar-10-batches-py/ (data_batch_1..5,
test_batch, batches.meta with `label_names`) and root/cifar-100-python/ (train, test, meta with
`fine_label_names`). Each batch is a pickle (latin1) of a dict: `data` uint8 (N, 3072), a row per
image, its red, green and blue 32x32 planes row-major; `labels` (CIFAR-10) or `fine_labels`
(CIFAR-100) a list of class indices.

The pickles are loaded by an unpickler that builds numpy arrays, lists, dicts and strings only: a
file that refers to anything else is refused without running it.
"""
from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import numpy as np

from simmatch.archives.common import (
    ARCHIVE_FOLDER,
    TITLE,
    Arrays,
    image_names,
    integer_labels,
    refetch,
    require_files,
    shape_text,
    shown,
)
from simmatch.errors import DataError

SIDE = 32
ROW = 3 * SIDE * SIDE
BATCHES = {"cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
           "cifar100": {"train": ["train"], "test": ["test"]}}
META = {"cifar10": ("batches.meta", "label_names"), "cifar100": ("meta", "fine_label_names")}
LABEL_KEY = {"cifar10": "labels", "cifar100": "fine_labels"}
CLASS_COUNT = {"cifar10": 10, "cifar100": 100}
OTHER = {"cifar10": "cifar100", "cifar100": "cifar10"}

# What a CIFAR pickle may refer to: numpy's array reconstruction (the names numpy 1 and 2 pickle
# under) and the codec Python 3 pickles bytes with at protocol 2.
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _Foreign(Exception):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.what = f"{module}.{name}"


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise _Foreign(module, name)
        if module.startswith("numpy.core."):
            # numpy 2 keeps numpy 1's numpy.core as a deprecated alias of numpy._core
            try:
                return getattr(importlib.import_module("numpy._core." + module[len("numpy.core."):]), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


def archive_dir(name: str, root: Path) -> Path:
    return root / ARCHIVE_FOLDER[name]


def expected(name: str, root: Path, split: str | None) -> list[Path]:
    """The files of `split` (every split's when None), the meta file last."""
    folder = archive_dir(name, root)
    splits = [split] if split else ["train", "test"]
    return [folder / f for s in splits for f in BATCHES[name][s]] + [folder / META[name][0]]


def load_pickle(name: str, root: Path, path: Path) -> dict:
    """The dict a CIFAR file holds, or one DataError line."""
    try:
        with open(path, "rb") as f:
            obj = _ArraysOnly(f, encoding="latin1").load()
    except _Foreign as exc:
        raise DataError(f"{shown(path)}: the pickle refers to {shown(exc.what)}, which no {TITLE[name]} file "
                        f"holds: not a {TITLE[name]} file (refused without loading it)") from None
    except OSError as exc:
        raise DataError(f"{shown(path)} cannot be read ({exc.strerror or 'an OS error'})") from None
    except MemoryError:
        raise
    except Exception:
        raise DataError(f"{shown(path)} does not load as a pickle (truncated or damaged)"
                        f"{refetch(name, root)}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{shown(path)} holds a {type(obj).__name__}, not the dict of a {TITLE[name]} file")
    return obj


def read_classes(name: str, root: Path, path: Path) -> list[str]:
    meta = load_pickle(name, root, path)
    key = META[name][1]
    if key not in meta:
        other = OTHER[name]
        if META[other][1] in meta:
            raise DataError(f"{shown(path)} is {TITLE[other]}'s meta file (it holds {META[other][1]}, not {key}): "
                            f"not part of {TITLE[name]}")
        raise DataError(f"{shown(path)} holds no {key}: not {TITLE[name]}'s meta file")
    classes = meta[key]
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{shown(path)}: its {key} are not a list of strings: not {TITLE[name]}'s meta file")
    if len(classes) != CLASS_COUNT[name]:
        raise DataError(f"{shown(path)}: it names {len(classes)} classes, {TITLE[name]} has {CLASS_COUNT[name]}: "
                        f"not {TITLE[name]}'s meta file")
    return list(classes)


def read_batch(name: str, root: Path, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(data uint8 (N, 3072), labels int64 (N,)) of one batch file, checked."""
    batch = load_pickle(name, root, path)
    key = LABEL_KEY[name]
    if "data" not in batch:
        raise DataError(f"{shown(path)} holds no data entry: not a {TITLE[name]} batch")
    if key not in batch:
        other = OTHER[name]
        if LABEL_KEY[other] in batch:
            raise DataError(f"{shown(path)} is a {TITLE[other]} batch (it holds {LABEL_KEY[other]}, not {key}): "
                            f"not part of {TITLE[name]}")
        raise DataError(f"{shown(path)} holds no {key} entry: not a {TITLE[name]} batch")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW:
        what = (f"{shape_text(data.shape)} {data.dtype.name}" if isinstance(data, np.ndarray)
                else f"a {type(data).__name__}")
        raise DataError(f"{shown(path)}: its data is {what}, not (N, {ROW}) uint8 (a {SIDE}x{SIDE} RGB image "
                        f"per row): not a {TITLE[name]} batch")
    labels = integer_labels(batch[key], path, len(data), key)
    if labels.size and (labels.min() < 0 or labels.max() >= CLASS_COUNT[name]):
        bad = int(np.flatnonzero((labels < 0) | (labels >= CLASS_COUNT[name]))[0])
        raise DataError(f"{shown(path)}: label {int(labels[bad])} (of image {bad}) is outside "
                        f"0..{CLASS_COUNT[name] - 1}: not a {TITLE[name]} batch")
    return data, labels


def read(name: str, root: Path, split: str) -> Arrays:
    """Split `train` or `test` of CIFAR-10 or CIFAR-100, as torchvision reads it (batches in order)."""
    paths = expected(name, root, split)
    require_files(name, root, paths)
    *batch_paths, meta_path = paths
    classes = read_classes(name, root, meta_path)
    parts = [read_batch(name, root, p) for p in batch_paths]
    count = sum(len(data) for data, _ in parts)
    images = np.empty((count, SIDE, SIDE, 3), dtype=np.uint8)
    start = 0
    for data, _ in parts:
        images[start:start + len(data)] = data.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)
        start += len(data)
    labels = np.concatenate([labels for _, labels in parts]) if parts else np.empty(0, np.int64)
    return Arrays(images=images, labels=labels.astype(np.int64), classes=classes,
                  files=[str(p) for p in paths], names=image_names(split, count))
