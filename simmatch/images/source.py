"""Where the encoded bytes of an image come from: the interface, and a folder tree (a shard set is
simmatch/shards/source.py, an archive's pixels simmatch/images/arrays.py; data.format chooses,
simmatch/shards/formats.py).

The streams name images by their path relative to the split (`<class>/<file>`) whatever the
format, so split lists, bank slots, the order and every seed are the same; only `read` differs.
`where(rel)` is how an error names the image: the file, or the image, the shard holding it and
its byte offset there (`cls/x.jpg (in shard /o/train/000003.tar at offset 51712)`).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Protocol


class ImageSource(Protocol):
    kind: str
    root: Path

    def read(self, rel: str) -> bytes: ...

    def has(self, rel: str) -> bool: ...

    def open(self, rel: str) -> Path | io.BytesIO: ...

    def where(self, rel: str) -> str: ...



class FolderSource:
    """Images as files under `root`."""

    kind = "folder"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def has(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    def open(self, rel: str) -> Path:
        return self.root / rel

    def where(self, rel: str) -> str:
        return str(self.root / rel)
