"""The shard set's index: for every image its shard, byte offset, size, class, checksum and path.

A shard set is a folder `OUT` holding `OUT/<split>/NNNNNN.tar` (the webdataset layout: each
image is a `KEY.<ext>` member followed by `KEY.cls`, its class number as text) and one index
per split, `OUT/<split>.index`. The index's first line is a JSON header (format, classes, and
each shard's name, bytes, images and sha256); every further line is one image, in the sorted
order of the tree it was packed from:

    shard <TAB> offset <TAB> size <TAB> class <TAB> crc32 (8 hex digits) <TAB> relative path

The path is the image's path relative to the split folder it came from (`<class>/<file>`), so
split lists name images exactly as they name them in the folder tree. No torch here.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simmatch.errors import DataError

FORMAT = "simmatch-shards"
VERSION = 1
INDEX_SUFFIX = ".index"
SPLITS = ("train", "val")


def index_path(out: str | Path, split: str) -> Path:
    return Path(out) / f"{split}{INDEX_SUFFIX}"


def member_key(rel: str) -> str:
    """The webdataset key of an image: its path without the extension, '%' and '.' escaped
    (a webdataset reader splits a member name at its first dot), so keys stay unique."""
    stem, _ = os.path.splitext(rel)
    return stem.replace("%", "%25").replace(".", "%2E")


def member_ext(rel: str) -> str:
    return os.path.splitext(rel)[1].lstrip(".").lower() or "img"


@dataclass
class ShardInfo:
    name: str  # relative to the shard set's folder: "train/000000.tar"
    bytes: int
    images: int
    sha256: str


@dataclass
class ShardIndex:
    """One split of a shard set, loaded: numpy columns for the numbers, a list for the paths."""

    root: Path  # the shard set's folder (OUT)
    split: str
    classes: list[str]
    shards: list[ShardInfo]
    shard: np.ndarray  # int32 [N]
    offset: np.ndarray  # int64 [N]
    size: np.ndarray  # int64 [N]
    label: np.ndarray  # int32 [N]
    crc: np.ndarray  # uint32 [N]
    paths: list[str]
    rows: dict[str, int] = field(default_factory=dict, repr=False)  # path -> line (built on load)

    def __post_init__(self) -> None:
        if not self.rows:
            self.rows = {p: i for i, p in enumerate(self.paths)}

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def path(self) -> Path:
        return index_path(self.root, self.split)

    def shard_path(self, k: int) -> Path:
        return self.root / self.shards[k].name

    def row(self, rel: str) -> int:
        """The index line (0-based, header excluded) of the image `rel`."""
        try:
            return self.rows[rel]
        except KeyError:
            raise DataError(f"{rel}: no such image in {self.path}") from None


def header_of(split: str, classes: list[str], shards: list[ShardInfo], images: int) -> dict:
    return {"format": FORMAT, "version": VERSION, "split": split, "classes": classes, "images": images,
            "shards": [{"name": s.name, "bytes": s.bytes, "images": s.images, "sha256": s.sha256}
                       for s in shards]}


def index_text(header: dict, rows: list[tuple[int, int, int, int, int, str]]) -> str:
    lines = [json.dumps(header, separators=(",", ":"))]
    lines += [f"{s}\t{o}\t{n}\t{c}\t{crc:08x}\t{p}" for s, o, n, c, crc, p in rows]
    return "\n".join(lines) + "\n"


def read_index(out: str | Path, split: str) -> ShardIndex:
    """Load `OUT/<split>.index`; a missing, foreign or damaged index is one DataError line."""
    path = index_path(out, split)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"shard index not found: {path} (pack the data set with tools/make_shards.py SRC "
                        f"{Path(out)}, or set data.format=folder)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read shard index {path}: {exc}") from None
    lines = text.split("\n")
    try:
        header = json.loads(lines[0])
        if header.get("format") != FORMAT:
            raise ValueError("not a shard index")
        if header.get("version") != VERSION:
            raise ValueError(f"format version {header.get('version')}, this version reads {VERSION}")
        shards = [ShardInfo(s["name"], int(s["bytes"]), int(s["images"]), str(s["sha256"]))
                  for s in header["shards"]]
        body = [ln for ln in lines[1:] if ln]
        if len(body) != int(header["images"]):
            raise ValueError(f"{len(body)} image lines, the header says {header['images']}")
        cols = [ln.split("\t", 5) for ln in body]
        if any(len(c) != 6 for c in cols):
            raise ValueError("an image line has not 6 fields")
        shard = np.array([int(c[0]) for c in cols], dtype=np.int32)
        offset = np.array([int(c[1]) for c in cols], dtype=np.int64)
        size = np.array([int(c[2]) for c in cols], dtype=np.int64)
        label = np.array([int(c[3]) for c in cols], dtype=np.int32)
        crc = np.array([int(c[4], 16) for c in cols], dtype=np.uint32)
        paths = [c[5] for c in cols]
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise DataError(f"{path} is not a readable shard index: {exc}") from None
    index = ShardIndex(Path(out), split, list(header["classes"]), shards, shard, offset, size, label,
                       crc, paths)
    _check_consistent(index)
    return index


def _check_consistent(index: ShardIndex) -> None:
    """Every line's shard exists in the header and its bytes lie inside that shard."""
    n = len(index.shards)
    if len(index) and (index.shard.min() < 0 or index.shard.max() >= n):
        raise DataError(f"{index.path}: an image names a shard that the index does not list")
    ends = index.offset + index.size
    limits = np.array([s.bytes for s in index.shards], dtype=np.int64)
    over = np.flatnonzero(ends > limits[index.shard]) if len(index) else []
    if len(over):
        i = int(over[0])
        raise DataError(f"{index.path}: image {index.paths[i]} lies past the end of "
                        f"{index.shards[index.shard[i]].name}")
    if len(index) and (index.label.min() < 0 or index.label.max() >= len(index.classes)):
        raise DataError(f"{index.path}: an image's class is not one of the {len(index.classes)} classes")
