"""Where the encoded bytes of an image come from: a folder tree or a shard set (data.format).

The streams name images by their path relative to the split (`<class>/<file>`) whatever the
format, so split lists, bank slots, the order and every seed are the same; only `read` differs.
`where(rel)` is how an error names the image: the file, or the image, the shard holding it and
its byte offset there (`cls/x.jpg (in shard /o/train/000003.tar at offset 51712)`).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Protocol

from simmatch.shards.index import ShardIndex
from simmatch.shards.reader import OpenShards, read_row


class ImageSource(Protocol):
    kind: str
    root: Path

    def read(self, rel: str) -> bytes: ...

    def open(self, rel: str) -> Path | io.BytesIO: ...

    def where(self, rel: str) -> str: ...

    def rel_of(self, where: str) -> str | None: ...


class FolderSource:
    """Images as files under `root`."""

    kind = "folder"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def open(self, rel: str) -> Path:
        return self.root / rel

    def where(self, rel: str) -> str:
        return str(self.root / rel)

    def rel_of(self, where: str) -> str | None:
        try:
            return Path(where).relative_to(self.root).as_posix()
        except ValueError:
            return None


class ImageBytes(io.BytesIO):
    """An image's encoded bytes, shown as its path: PIL's 'cannot identify image file %r' then names
    the image instead of printing `<_io.BytesIO object at 0x...>`."""

    def __init__(self, data: bytes, rel: str) -> None:
        super().__init__(data)
        self.rel = rel

    def __repr__(self) -> str:
        return repr(self.rel)


class ShardSource:
    """Images inside the shards of one split's index, read by offset (simmatch/shards/reader.py)."""

    kind = "shards"

    def __init__(self, index: ShardIndex, max_open: int) -> None:
        self.index = index
        self.root = index.root / index.split
        self.files = OpenShards(max_open)  # its shards' descriptors, closed with the source

    def read(self, rel: str) -> bytes:
        return read_row(self.index, self.index.row(rel), self.files)

    def open(self, rel: str) -> io.BytesIO:
        return ImageBytes(self.read(rel), rel)

    def where(self, rel: str) -> str:
        return self.index.where(self.index.row(rel))

    def rel_of(self, where: str) -> str | None:
        rel, sep, _ = where.partition(" (in shard ")
        return rel if sep else None


def shard_opens() -> int:
    """Shard files this process has opened so far (benchmarks/loader.py counts them)."""
    return OpenShards.opened
