#!/usr/bin/env python
"""Write the loader benchmarks' photo tree: JPEGs of ImageNet's typical size from real photographs.

OUT/train/<c>/ holds `--count` images over two classes, OUT/val/<c>/ 50 per class: seeded crops of
scikit-learn's two bundled photographs (china: class 0, flower: class 1; 640 x 427), each a random
4:3 window of 60-100% of the photo's width, flipped at random, resized (bicubic) to `--size`
(500 x 375 by default) and saved at JPEG quality 90 (about 54 KB each, like ImageNet's photos).
The same seed writes the same files.

    python benchmarks/make_photos.py --out /tmp/photos/tree
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from simmatch.errors import ConfigError, cli_errors  # noqa: E402

VAL_PER_CLASS = 50


def write_photos(out: Path, count: int, size: tuple[int, int], seed: int = 0) -> dict[str, int]:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    written = {"train": 0, "val": 0}
    for split, per_class in (("train", count // 2), ("val", VAL_PER_CLASS)):
        for c, photo in enumerate(photos):
            folder = out / split / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                w = int(rng.integers(int(0.6 * photo.width), photo.width + 1))
                h = min(photo.height, round(w * size[1] / size[0]))
                x, y = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
                img = photo.crop((x, y, x + w, y + h)).resize(size, Image.BICUBIC)
                if rng.random() < 0.5:
                    img = img.transpose(Image.FLIP_LEFT_RIGHT)
                img.save(folder / f"{c}_{i:05d}.jpg", quality=90)
                written[split] += 1
    return written


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the tree to write (train/, val/)")
    parser.add_argument("--count", type=int, default=2000, help="training images (half per class)")
    parser.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.count < 2 or min(args.size) < 8:
        raise ConfigError(f"--count {args.count} --size {args.size[0]} {args.size[1]}: need at least 2 images "
                          "of at least 8 px")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty; give a new folder")
    written = write_photos(out, args.count, tuple(args.size), args.seed)
    files = list(out.rglob("*.jpg"))
    kb = sum(p.stat().st_size for p in files) / len(files) / 1024
    print(f"wrote {written['train']} train and {written['val']} val JPEGs of {args.size[0]} x {args.size[1]} px "
          f"({kb:.0f} KB on average) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
