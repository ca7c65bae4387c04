"""The shard set's index: for every image its shard, byte offset, size, class, checksum and path.

A shard set is a folder `OUT` holding `OUT/<split>/NNNNNN.tar` (the webdataset layout: each
image is a `KEY.<ext>` member followed by `KEY.cls`, its class number as text) and one index
per split, `OUT/<split>.index`. The index's first line is a JSON header (format, classes, and
each shard's name, bytes, images and sha256); every further line is one image, in the sorted
order of the tree it was packed from:

    shard <TAB> offset <TAB> size <TAB> class <TAB> crc32 (8 hex digits) <TAB> relative path

The path is the image's path relative to the split folder it came from (`<class>/<file>`), so
split lists name images exactly as they name them in the folder tree. The header also lists the
images left out of the packing (`skipped`: path and reason; make_shards.py --skip-bad).

Every index has a digest sidecar, `OUT/<split>.index.sha256` (`sha256sum -c` reads it), written
before the index is renamed into place; every read of the index checks it, so an index edited
after packing (a class changed, two paths swapped) is refused instead of training on it. No
torch here.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simmatch.errors import DataError
from simmatch.files.atomic import atomic_write_text, digest_path, write_atomic

FORMAT = "simmatch-shards"
VERSION = 2  # 2: a digest sidecar per index, unique member keys, the skipped images in the header
INDEX_SUFFIX = ".index"
SPLITS = ("train", "val")
REPACK = "pack the data set again (tools/make_shards.py SRC NEW_FOLDER) and train from the new folder"


def index_path(out: str | Path, split: str) -> Path:
    return Path(out) / f"{split}{INDEX_SUFFIX}"


def escape_key(text: str) -> str:
    """'%' and '.' escaped: a webdataset reader splits a member name at its first dot."""
    return text.replace("%", "%25").replace(".", "%2E")


def member_key(rel: str) -> str:
    """The webdataset key of an image alone: its path without the extension, escaped."""
    return escape_key(os.path.splitext(rel)[0])


def member_keys(paths: list[str]) -> list[str]:
    """The webdataset keys of a split's images, all distinct: the path without its extension, but
    the whole path (extension included) for images whose keys would collide (`dup.jpg` and
    `dup.png`: `dup%2Ejpg`, `dup%2Epng`). A function of the list alone, so a build is deterministic
    and a check can recompute them from the index."""
    stems = [member_key(p) for p in paths]
    counts = Counter(stems)
    keys = [escape_key(p) if counts[k] > 1 else k for p, k in zip(paths, stems)]
    while True:  # a whole-path key may equal another image's stem key ('x.jpg' and 'x.jpg.png')
        counts = Counter(keys)
        clash = [i for i, k in enumerate(keys) if counts[k] > 1 and k == stems[i]]
        if not clash:
            return keys
        for i in clash:
            keys[i] = escape_key(paths[i])  # whole paths are distinct: the escape is one-to-one


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
    skipped: dict[str, str] = field(default_factory=dict)  # path -> why it was left out of the packing
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

    def where(self, row: int) -> str:
        """How an error names image line `row`: its path, its shard and its byte offset there."""
        return f"{self.paths[row]} (in shard {self.shard_path(int(self.shard[row]))} at offset {int(self.offset[row])})"

    def row(self, rel: str) -> int:
        """The index line (0-based, header excluded) of the image `rel`."""
        try:
            return self.rows[rel]
        except KeyError:
            if rel in self.skipped:
                raise DataError(f"{rel}: left out of {self.path} when it was packed ({self.skipped[rel]}; "
                                f"{self.root / 'skipped.txt'} lists it)") from None
            raise DataError(f"{rel}: no such image in {self.path}") from None


def header_of(split: str, classes: list[str], shards: list[ShardInfo], images: int,
              skipped: list[tuple[str, str]] = ()) -> dict:
    return {"format": FORMAT, "version": VERSION, "split": split, "classes": classes, "images": images,
            "shards": [{"name": s.name, "bytes": s.bytes, "images": s.images, "sha256": s.sha256}
                       for s in shards],
            "skipped": [{"path": p, "reason": r} for p, r in skipped]}


def index_text(header: dict, rows: list[tuple[int, int, int, int, int, str]]) -> str:
    lines = [json.dumps(header, separators=(",", ":"))]
    lines += [f"{s}\t{o}\t{n}\t{c}\t{crc:08x}\t{p}" for s, o, n, c, crc, p in rows]
    return "\n".join(lines) + "\n"


def write_index(out: str | Path, split: str, text: str) -> None:
    """`OUT/<split>.index` and its digest sidecar: the sidecar is written (atomically) before the
    index is renamed into place, so an index under its name always has its digest beside it."""
    path = index_path(out, split)
    write_atomic(path, lambda f: f.write(text.encode("utf-8")),
                 before_rename=lambda sha: atomic_write_text(digest_path(path), f"{sha}  {path.name}\n"))


def index_version(path: Path) -> int | None:
    """The format version in an index's header (None when unreadable): is it this version's?"""
    try:
        with open(path, encoding="utf-8") as f:
            return int(json.loads(f.readline()).get("version"))
    except (OSError, ValueError, TypeError, AttributeError):
        return None



def check_digest(path: Path, data: bytes) -> None:
    """The index's bytes against its sidecar: an edited index is one line saying to pack again."""
    sidecar = digest_path(path)
    try:
        recorded = sidecar.read_text(encoding="utf-8").split()[0]
    except FileNotFoundError:
        raise DataError(f"{path} has no digest ({sidecar.name} is missing), so an edit of the index cannot be "
                        f"ruled out; restore {sidecar.name}, or {REPACK}") from None
    except (OSError, UnicodeDecodeError, IndexError) as exc:
        raise DataError(f"cannot read the digest of {path} ({sidecar}): {exc}") from None
    if hashlib.sha256(data).hexdigest() != recorded:
        raise DataError(f"{path} does not match its digest {sidecar.name}: the index was changed after it was "
                        f"packed (an image's class or path edited, or another packing's index copied over it), "
                        f"and a run would train on something else; restore the index, or {REPACK}")


def read_index(out: str | Path, split: str) -> ShardIndex:
    """Load `OUT/<split>.index`; a missing, foreign, damaged or edited index (its bytes against its
    digest sidecar, checked on every load: ~50 ms for ImageNet's 83 MB) is one DataError line."""
    path = index_path(out, split)
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"shard index not found: {path} (pack the data set with tools/make_shards.py SRC "
                        f"{Path(out)}, or set data.format=folder)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read shard index {path}: {exc}") from None
    lines = text.split("\n")
    try:
        header = json.loads(lines[0])
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ValueError("not a shard index")
    except ValueError as exc:
        raise DataError(f"{path} is not a readable shard index: {exc}") from None
    version = header.get("version")
    if isinstance(version, int) and version < VERSION:
        raise DataError(f"{path} was packed by an earlier tools/make_shards.py (index format {version}: no "
                        f"digest, member keys that may collide); {REPACK}")
    if version != VERSION:
        raise DataError(f"{path} has index format {version}; this version reads format {VERSION} "
                        f"(use the tools/make_shards.py that packed it, or {REPACK})")
    check_digest(path, data)
    try:
        if header.get("split") != split:
            raise ValueError(f"its header names split {header.get('split')!r}, not {split!r}")
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
        skipped = {str(s["path"]): str(s["reason"]) for s in header.get("skipped", [])}
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise DataError(f"{path} is not a readable shard index: {exc}") from None
    index = ShardIndex(Path(out), split, list(header["classes"]), shards, shard, offset, size, label,
                       crc, paths, skipped=skipped)
    _check_consistent(index)
    return index


def _check_consistent(index: ShardIndex) -> None:
    """Every path once, every line's shard in the header and its bytes inside that shard."""
    if len(index.rows) != len(index.paths):
        seen: set[str] = set()
        twice = next(p for p in index.paths if p in seen or seen.add(p))
        raise DataError(f"{index.path} lists {twice} more than once (an edited index?); {REPACK}")
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
