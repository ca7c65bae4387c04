"""Images held as pixels (the CIFAR, SVHN and STL-10 archives, simmatch/archives/) as an image
source (simmatch/images/source.py).

The pipelines take the pixels themselves (`pixels`: uint8 HWC, nothing to decode); `read` gives
a PNG of them (lossless) for what works on encoded images: the decoding checks, tools/check_data.py.
An image is named by its archive name (`train/00042`), and an error by that name, its position
and the archive file it came from.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np


class ArraySource:
    """The images of one or more arrays, by name."""

    kind = "arrays"

    def __init__(self, root: Path, parts: list[tuple[list[str], np.ndarray, str]]) -> None:
        """`parts`: (names, images N x H x W x 3 uint8, the archive it was read from) each."""
        self.root = Path(root)
        self._where: dict[str, tuple[np.ndarray, int, str]] = {}
        for names, images, origin in parts:
            for i, name in enumerate(names):
                self._where[name] = (images, i, origin)

    def has(self, rel: str) -> bool:
        return rel in self._where

    def pixels(self, rel: str) -> np.ndarray:
        images, i, _ = self._where[rel]
        return np.ascontiguousarray(images[i])

    def read(self, rel: str) -> bytes:
        from PIL import Image

        out = io.BytesIO()
        Image.fromarray(self.pixels(rel)).save(out, format="PNG")
        return out.getvalue()

    def open(self, rel: str) -> io.BytesIO:
        return io.BytesIO(self.read(rel))

    def where(self, rel: str) -> str:
        if rel not in self._where:
            return f"{rel} (not in {self.root})"
        _, i, origin = self._where[rel]
        return f"{rel} (image {i} of {origin})"
