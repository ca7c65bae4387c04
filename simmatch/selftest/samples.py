"""The images the self-test decodes: real JPEGs in a small ImageNet-style tree.

Without --data: scikit-learn's two bundled photographs (china, flower: 640x427 colour JPEGs)
cut and resized into several images of different sizes, plus two classes of its handwritten
digits. With --data: symbolic links to the first files of the first classes of that tree,
so every check reads the user's own images without scanning all of them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from simmatch.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".JPEG", ".JPG")
PER_CLASS = {"train": 8, "val": 3}


def write_samples(out: Path, seed: int = 0) -> Path:
    """out/train/<class>/*.jpg and out/val/<class>/*.jpg: 4 classes, 8 + 3 images each."""
    from PIL import Image
    from sklearn.datasets import load_digits, load_sample_images

    rng = np.random.default_rng(seed)
    classes: dict[str, list[Image.Image]] = {}
    photos = load_sample_images()
    for name, array in zip(("china", "flower"), photos.images):
        img, crops = Image.fromarray(array), []
        h, w = array.shape[:2]
        for _ in range(sum(PER_CLASS.values())):
            cw, ch = int(rng.integers(w // 2, w + 1)), int(rng.integers(h // 2, h + 1))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            side = int(rng.integers(160, 481))  # longer side of the written image
            scale = side / max(cw, ch)
            crops.append(img.crop((x, y, x + cw, y + ch)).resize(
                (max(8, round(cw * scale)), max(8, round(ch * scale))), Image.BICUBIC))
        classes[name] = crops
    digits = load_digits()
    for digit in (0, 1):
        idx = np.flatnonzero(digits.target == digit)[:sum(PER_CLASS.values())]
        grey = np.clip(digits.images[idx] * (255.0 / 16.0), 0, 255).astype(np.uint8)
        classes[f"digit{digit}"] = [Image.fromarray(g).resize((96, 96), Image.BICUBIC).convert("RGB")
                                    for g in grey]
    for name, images in classes.items():
        for i, img in enumerate(images):
            split = "train" if i < PER_CLASS["train"] else "val"
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"{name}_{i:02d}.jpg", quality=90)
    return out


def link_subset(data: Path, out: Path, classes: int = 4) -> Path:
    """out/<split>/<class>/ links to the first files of the first `classes` classes of `data`."""
    for split, per_class in PER_CLASS.items():
        src = data / split
        if not src.is_dir():
            raise DataError(f"--data {data}: no {split}/ folder (an ImageNet-style tree is needed)")
        folders = sorted(p for p in src.iterdir() if p.is_dir())[:classes]
        if not folders:
            raise DataError(f"--data {data}: {src} holds no class folders")
        for folder in folders:
            files = sorted(p for p in folder.iterdir() if p.suffix in IMAGE_SUFFIXES)[:per_class]
            if not files:
                raise DataError(f"--data {data}: {folder} holds no images")
            dst = out / split / folder.name
            dst.mkdir(parents=True, exist_ok=True)
            for f in files:
                (dst / f.name).symlink_to(f.resolve())
    return out


def image_files(root: Path, split: str) -> list[str]:
    """Paths relative to root/split, sorted: the file lists DALI's reader takes."""
    base = root / split
    return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.suffix in IMAGE_SUFFIXES)
