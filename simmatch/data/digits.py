"""scikit-learn's bundled digits as an ImageNet-style JPEG tree: a real, tiny, offline data set."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from simmatch.errors import DataError


def write_digits(out: str | Path, size: int = 32, val_fraction: float = 0.22, seed: int = 0,
                 quality: int = 95) -> dict[str, int]:
    """Write out/train/<digit>/*.jpg and out/val/<digit>/*.jpg; returns the image count per split.

    The split is stratified and seeded, the 8x8 images (values 0..16) are scaled to 0..255 and
    upscaled bicubically to `size` px, grey replicated to RGB: the same bytes on every run.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a test/demo extra
        raise DataError("make_digits needs scikit-learn (pip install scikit-learn)") from exc
    from PIL import Image

    if size < 8:
        raise DataError(f"--size must be at least 8, got {size}")
    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    targets = digits.target.astype(int)
    rng = np.random.default_rng(seed)
    out = Path(out)
    counts = {"train": 0, "val": 0}
    for cls in range(10):
        idx = np.flatnonzero(targets == cls)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * val_fraction))
        for split, members in (("val", idx[:n_val]), ("train", idx[n_val:])):
            folder = out / split / str(cls)
            folder.mkdir(parents=True, exist_ok=True)
            for i in sorted(members.tolist()):
                img = Image.fromarray(images[i]).resize((size, size), Image.BICUBIC)
                img.convert("RGB").save(folder / f"{i:04d}.jpg", quality=quality)
                counts[split] += 1
    return counts
