"""The images of one split of a shard set as an image source (simmatch/images/source.py): read by
offset through a bounded set of open shards (reader.py), each checked by its CRC-32, and named in
errors by path, shard and byte offset."""
from __future__ import annotations

import io

from simmatch.shards.index import ShardIndex
from simmatch.shards.reader import OpenShards, read_row


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

    def has(self, rel: str) -> bool:
        return rel in self.index.rows

    def open(self, rel: str) -> io.BytesIO:
        return ImageBytes(self.read(rel), rel)

    def where(self, rel: str) -> str:
        return self.index.where(self.index.row(rel))



def shard_opens() -> int:
    """Shard files this process has opened so far (benchmarks/loader.py counts them)."""
    return OpenShards.opened
