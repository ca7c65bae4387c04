"""Does a shard set match its index? A quick check for every start, a full one for check_data.

`check_layout` (every start, before the first step): each shard exists and has the size the
index records, and the tar headers before its first and last image describe them: a missing
or truncated shard, or an index of another packing, is one line naming the shard. It costs a
stat and two 512-byte reads per shard. `check_digests` (tools/check_data.py, --check --full) reads
every byte: the sha256 of each shard against the index, which also catches altered bytes; and
`digest_problems` also walks each shard's tar headers (`line_problems`): every index line must
name the member at its offset (path, size) and the class its `.cls` member holds, so an edited
index is named line by line even where its digest sidecar was rewritten with it.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np

from simmatch.errors import DataError
from simmatch.files.atomic import file_sha256
from simmatch.images.decode import Progress
from simmatch.shards.index import ShardIndex, member_ext, member_keys
from simmatch.shards.reader import TAR_BLOCK, OpenShards, member_header_problem

SHOWN_LINES = 5  # mismatched index lines named per shard


class ByteProgress(Progress):
    """Progress in megabytes: reading shards back for their sha256."""

    def line(self) -> str:
        pct = 100 * self.done // max(1, self.total)
        return f"{self.what} {self.done / 1e6:,.0f}/{self.total / 1e6:,.0f} MB ({pct}%)"


def shard_rows(index: ShardIndex) -> list[np.ndarray]:
    """The index lines of every shard, ascending, from one sort of the index (not a scan of the
    whole index per shard: ImageNet's has 1.28M lines and ~150 shards)."""
    order = np.argsort(index.shard, kind="stable")
    counts = np.bincount(index.shard, minlength=len(index.shards))
    return np.split(order, np.cumsum(counts)[:-1])


def check_layout(index: ShardIndex) -> None:
    files = OpenShards(1)
    per_shard = shard_rows(index)
    try:
        for k, info in enumerate(index.shards):
            path = index.shard_path(k)
            try:
                found = os.stat(path).st_size
            except FileNotFoundError:
                raise DataError(f"shard missing: {path} (listed in {index.path}); restore it, or pack the "
                                f"data set again with tools/make_shards.py") from None
            if found != info.bytes:
                if ends_whole(path, files):  # a whole tar of another size: the index is another packing's
                    raise DataError(f"shard {path} does not match its index {index.path}: {found:,} bytes, the "
                                    f"index records {info.bytes:,}; use the index packed with these shards")
                raise DataError(f"shard {path} is truncated: {found:,} bytes, {index.path} records "
                                f"{info.bytes:,}; restore it or pack the data set again")
            rows = per_shard[k]
            if len(rows) != info.images:
                raise DataError(f"{index.path} lists {len(rows)} images in {path}, its header {info.images}")
            for row in {int(rows[0]), int(rows[-1])} if len(rows) else ():
                problem = member_header_problem(index, row, files)
                if problem is not None:
                    raise DataError(f"shard {path} does not match its index {index.path}: {problem}; "
                                    f"use the index packed with these shards")
    finally:
        files.close()


def ends_whole(path: os.PathLike, files: OpenShards) -> bool:
    """Does the file end with a tar's end-of-archive (1024 zero bytes)? A cut-off shard does not."""
    size = os.stat(path).st_size
    return size >= 1024 and files.pread(path, 1024, size - 1024) == bytes(1024)


def check_digests(index: ShardIndex, step: Callable[[int], None] | None = None) -> list[tuple[int, str]]:
    """(shard number, reason) for every shard whose bytes are not those packed: missing, another
    size or another sha256 ("altered"); `step(n)` after every n bytes read."""
    problems = []
    for k, info in enumerate(index.shards):
        path = index.shard_path(k)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            problems.append((k, "missing"))
            continue
        if size != info.bytes:
            problems.append((k, f"{size:,} bytes, the index records {info.bytes:,}"))
            continue
        if file_sha256(path, step) != info.sha256:
            problems.append((k, "its sha256 differs from the index's: the shard was altered"))
    return problems


def digest_problems(index: ShardIndex, step: Callable[[int], None] | None = None) -> list[tuple[str, str]]:
    """(shard path, reason) of check_digests, an altered shard's reason naming the images whose
    bytes changed (by their CRC-32), or saying that only tar headers or padding did; then
    (image where, reason) of the first SHOWN_LINES index lines that do not describe their shard's
    member (`line_problems`, for each shard of the recorded size) and a count of the others."""
    problems, unreadable = [], set()
    for k, reason in check_digests(index, step):
        if "altered" in reason:
            named = damaged_images(index, k)
            more = " ..." if len(named) > 5 else ""
            reason += (f" (images whose bytes changed: {', '.join(named[:5])}{more})" if named
                       else " (in a tar header or padding: no image's bytes changed)")
        else:
            unreadable.add(k)  # missing or another size: its lines cannot be compared
        problems.append((str(index.shard_path(k)), reason))
    keys, per_shard, lines, more = member_keys(index.paths), shard_rows(index), [], 0
    for k in range(len(index.shards)):
        if k not in unreadable:
            found = line_problems(index, k, per_shard[k], keys)
            room = SHOWN_LINES - len(lines)
            lines += found[:room]
            more += len(found[room:])
    if more:
        lines.append((str(index.path), f"and {more} more lines that do not describe their shards' members"))
    return problems + lines


def tar_members(path: os.PathLike) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of every member of a tar that make_shards wrote (ustar headers, a
    PAX header where a name needs one): a header walk by positional reads, several times faster
    than tarfile's (1.28M images: ~2.5M headers); a header it cannot read is a ValueError."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        pos, long_name = 0, None
        while True:
            head = os.pread(fd, TAR_BLOCK, pos)
            if len(head) < TAR_BLOCK:
                raise ValueError(f"the tar ends inside a header at byte {pos}")
            if head == bytes(TAR_BLOCK):
                return
            if head[257:262] != b"ustar" or head[124] & 0x80:
                raise ValueError(f"no ustar header at byte {pos}")
            size = int(head[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            data, kind = pos + TAR_BLOCK, head[156:157]
            if kind == b"x":  # PAX records ("LEN key=value\n") for the next member: its whole name
                long_name = pax_path(os.pread(fd, size, data)) or long_name
            elif kind != b"g":
                name = head[:100].split(b"\0", 1)[0]
                prefix = head[345:500].split(b"\0", 1)[0]
                yield (long_name if long_name is not None
                       else (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape")), data, size
                long_name = None
            pos = data + -(-size // TAR_BLOCK) * TAR_BLOCK
    finally:
        os.close(fd)


def pax_path(records: bytes) -> str | None:
    """The `path` of a PAX extended header's records, or None."""
    pos = 0
    while pos < len(records):
        space = records.index(b" ", pos)
        length = int(records[pos:space])
        key, _, value = records[space + 1:pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += length
    return None


def line_problems(index: ShardIndex, k: int, rows: np.ndarray, keys: list[str]) -> list[tuple[str, str]]:
    """(image where, reason) of each index line of shard `k` (`rows`) whose offset is not where the
    shard's member of that path and size starts, or whose class is not its `.cls` member's;
    `keys`: member_keys of the whole index. One walk over the
    tar headers (`tar_members`), reading the small `.cls` payloads."""
    path = index.shard_path(k)
    members: dict[int, tuple[str, int, str | None]] = {}  # data offset -> (image name, size, class text)
    try:
        with open(path, "rb") as f:
            image = None
            for name, offset, size in tar_members(path):
                if image is not None and name.endswith(".cls") and name[:-4] == image[0].rsplit(".", 1)[0]:
                    text = os.pread(f.fileno(), min(size, 64), offset).decode("utf-8", "replace").strip()
                    members[image[1]] = (image[0], image[2], text)
                    image = None
                    continue
                if image is not None:
                    members[image[1]] = (image[0], image[2], None)
                image = (name, offset, size)
            if image is not None:
                members[image[1]] = (image[0], image[2], None)
    except (OSError, ValueError) as exc:
        return [(str(path), f"cannot read its tar headers: {exc}")]
    bad = []
    for row in rows.tolist():
        rel, offset = index.paths[row], int(index.offset[row])
        found = members.get(offset)
        expected = f"{keys[row]}.{member_ext(rel)}"
        if found is None:
            reason = f"no tar member starts at byte {offset}"
        elif found[0] != expected:
            reason = f"the member at this offset is {found[0]}, not {expected} (the index line's path)"
        elif found[1] != int(index.size[row]):
            reason = f"the member has {found[1]} bytes, the index line says {int(index.size[row])}"
        elif found[2] != str(int(index.label[row])):
            label = int(index.label[row])
            reason = (f"the index line says class {label} ({index.classes[label]}), the shard's "
                      f"{keys[row]}.cls says {found[2] if found[2] is not None else 'nothing (no .cls member)'}")
        else:
            continue
        bad.append((index.where(row), f"{reason}: {index.path} was edited or is another packing's"))
    return bad


def damaged_images(index: ShardIndex, shard: int) -> list[str]:
    """The images of an altered shard whose bytes no longer match their CRC-32 (to name them)."""
    from simmatch.shards.reader import read_row

    files, bad = OpenShards(1), []
    try:
        for row in np.flatnonzero(index.shard == shard):
            try:
                read_row(index, int(row), files)
            except DataError:
                bad.append(index.paths[int(row)])
    finally:
        files.close()
    return bad
