"""scikit-learn's bundled digits as an ImageNet-style JPEG tree, or as a CIFAR-10 archive in
torchvision's format: a real, tiny, offline data set."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from simmatch.errors import DataError


def _digits(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as uint8 RGB images of `size` px (values 0..16 scaled to 0..255, upscaled
    bicubically, grey replicated) and their classes."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a test/demo extra
        raise DataError("make_digits needs scikit-learn (pip install scikit-learn)") from exc
    from PIL import Image

    digits = load_digits()
    small = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC).convert("RGB"))
                       for im in small])
    return images, digits.target.astype(int)


def _split(targets: np.ndarray, val_fraction: float, seed: int) -> dict[str, list[int]]:
    """A stratified, seeded train / val split of the digits' indices, each sorted."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {"train": [], "val": []}
    for cls in range(10):
        idx = np.flatnonzero(targets == cls)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * val_fraction))
        out["val"] += sorted(idx[:n_val].tolist())
        out["train"] += sorted(idx[n_val:].tolist())
    return out


def write_digits_cifar10(out: str | Path, val_fraction: float = 0.22, seed: int = 0) -> dict[str, int]:
    """Write out/cifar-10-batches-py/ as torchvision's CIFAR10 class lays it out (5 training batches,
    test_batch, batches.meta; pickles of 32 x 32 RGB rows, channel-major): the digits as a CIFAR-10
    archive that data.format=cifar10 reads (the Table 1 recipes on a CPU). Same split as the tree."""
    import pickle

    images, targets = _digits(32)
    split = _split(targets, val_fraction, seed)
    folder = Path(out) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, index: list[int], label: str) -> None:
        rows = images[index].transpose(0, 3, 1, 2).reshape(len(index), -1)
        entry = {"batch_label": label, "labels": [int(targets[i]) for i in index], "data": rows,
                 "filenames": [f"digit_{i:04d}.png" for i in index]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)

    train = split["train"]
    for k in range(5):
        dump(f"data_batch_{k + 1}", train[k::5], f"training batch {k + 1} of 5")
    dump("test_batch", split["val"], "testing batch 1 of 1")
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(c) for c in range(10)], "num_cases_per_batch": len(train[0::5]),
                     "num_vis": 3072}, f, protocol=2)
    return {"train": len(train), "val": len(split["val"])}


def write_digits(out: str | Path, size: int = 32, val_fraction: float = 0.22, seed: int = 0,
                 quality: int = 95) -> dict[str, int]:
    """Write out/train/<digit>/*.jpg and out/val/<digit>/*.jpg; returns the image count per split.

    The split is stratified and seeded, the 8x8 images (values 0..16) are scaled to 0..255 and
    upscaled bicubically to `size` px, grey replicated to RGB: the same bytes on every run.
    """
    from PIL import Image

    if size < 8:
        raise DataError(f"--size must be at least 8, got {size}")
    images, targets = _digits(size)
    out = Path(out)
    counts = {}
    for name, members in _split(targets, val_fraction, seed).items():
        for i in members:
            folder = out / name / str(targets[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / f"{i:04d}.jpg", quality=quality)
        counts[name] = len(members)
    return counts
