"""Does a shard set match its index? A quick check for every start, a full one for check_data.

`check_layout` (every start, before the first step): each shard exists and has the size the
index records, and the tar headers before its first and last image describe them: a missing
or truncated shard, or an index of another packing, is one line naming the shard. It costs a
stat and two 512-byte reads per shard. `check_digests` (tools/check_data.py, --check --full) reads
every byte: the sha256 of each shard against the index, which also catches altered bytes.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from simmatch.checkpoint.atomic import file_sha256
from simmatch.data.checks import Progress
from simmatch.errors import DataError
from simmatch.shards.index import ShardIndex
from simmatch.shards.reader import OpenShards, member_header_problem


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
    bytes changed (by their CRC-32), or saying that only tar headers or padding did."""
    problems = []
    for k, reason in check_digests(index, step):
        if "altered" in reason:
            named = damaged_images(index, k)
            more = " ..." if len(named) > 5 else ""
            reason += (f" (images whose bytes changed: {', '.join(named[:5])}{more})" if named
                       else " (in a tar header or padding: no image's bytes changed)")
        problems.append((str(index.shard_path(k)), reason))
    return problems


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
