#!/usr/bin/env python
"""Cost of the image check run before the first step (data.check_images) and by --check.

Writes N ImageNet-sized JPEGs (500 x 375..500, quality 90, ~110 KiB like ImageNet's val
images) and times the 1/8-scale decode check against a full decode. The last line is one
JSON object with milliseconds per image.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from simmatch.images.decode import (
    find_undecodable,  # noqa: E402
    image_problem,  # noqa: E402
)


def write_images(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        h, w = 375 + int(rng.integers(0, 125)), 500
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([x * 255 / w, y * 255 / h, (x + y) % 255], -1) + rng.normal(0, 20, (h, w, 3))
        path = folder / f"{i}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        files.append(path)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = write_images(Path(tmp), args.images)
        t = time.perf_counter()
        assert all(image_problem(f) is None for f in files)
        full = (time.perf_counter() - t) / len(files) * 1e3
        t = time.perf_counter()
        assert find_undecodable(files, 1) == []
        fast = (time.perf_counter() - t) / len(files) * 1e3
        t = time.perf_counter()
        find_undecodable(files, args.threads)
        threaded = (time.perf_counter() - t) / len(files) * 1e3
    print(f"full decode {full:.1f} ms/image, 1/8-scale check {fast:.1f} ms/image on one thread, "
          f"{threaded:.1f} ms/image (wall) on {args.threads} threads")
    print(json.dumps({"full_ms": round(full, 2), "check_ms": round(fast, 2),
                      "check_threads_ms": round(threaded, 2), "threads": args.threads}))


if __name__ == "__main__":
    main()
