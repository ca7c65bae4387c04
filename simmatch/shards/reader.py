"""Random access into a shard set: positional reads by (shard, offset, size), few open files.

Each process keeps at most `max_open` shard files open (least recently used closed first) and
reads with `os.pread`, which moves no file offset: threads share one descriptor, and so do the
processes a DataLoader forks (each then opens its own as it needs). Every image read is
checked against its CRC-32 in the index, so damaged bytes are named (shard and image) when
they are read, not decoded into a wrong picture.
"""
from __future__ import annotations

import errno
import os
import threading
import zlib
from collections import OrderedDict
from pathlib import Path

from simmatch.errors import DataError
from simmatch.shards.index import ShardIndex

TAR_BLOCK = 512


class OpenShards:
    """A bounded, thread-safe cache of read-only shard descriptors; `opens` counts its open() calls,
    `OpenShards.opened` those of every cache of this process.

    A descriptor evicted while another thread reads through it is closed only when that read ends
    (closing it at once could hand its number to the next open, and the read to another file)."""

    opened = 0

    def __init__(self, max_open: int) -> None:
        self.max_open = max(1, max_open)
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._users: dict[int, int] = {}  # descriptor -> reads in flight
        self._retired: set[int] = set()  # evicted, closed when their last read ends
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.opens = 0

    def pread(self, path: Path, size: int, offset: int) -> bytes:
        """`size` bytes of `path` at `offset` (fewer only at the end of the file)."""
        with self._lock:
            fd = self._acquire(str(path))
            self._users[fd] = self._users.get(fd, 0) + 1
        try:
            return pread_exact(fd, size, offset)
        finally:
            with self._lock:
                self._users[fd] -= 1
                if not self._users[fd]:
                    del self._users[fd]
                    if fd in self._retired:
                        self._retired.discard(fd)
                        os.close(fd)

    def _acquire(self, key: str) -> int:
        """The descriptor of `key`, opened if needed (the caller holds the lock)."""
        if self._pid != os.getpid():  # a forked child: the parent's descriptors are its own to close
            self._fds.clear()
            self._users.clear()
            self._retired.clear()
            self._pid = os.getpid()
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
            return fd
        try:
            fd = os.open(key, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise DataError(f"shard missing: {key} (restore it, or pack the data set again with "
                            f"tools/make_shards.py)") from None
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise DataError(f"cannot open shard {key}: too many open files: lower data.max_open_shards "
                                f"({self.max_open}) or raise the limit (ulimit -n)") from None
            raise DataError(f"cannot open shard {key}: {exc.strerror}") from None
        self.opens += 1
        OpenShards.opened += 1
        self._fds[key] = fd
        while len(self._fds) > self.max_open:
            _, old = self._fds.popitem(last=False)
            if self._users.get(old):
                self._retired.add(old)
            else:
                os.close(old)
        return fd

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                for fd in self._fds.values():
                    if self._users.get(fd):
                        self._retired.add(fd)
                    else:
                        os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __getstate__(self) -> dict:  # sent to a spawned worker: no descriptors travel
        return {"max_open": self.max_open}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_open"])


def pread_exact(fd: int, size: int, offset: int) -> bytes:
    """`size` bytes at `offset`, fewer only at the end of the file."""
    parts, done = [], 0
    while done < size:
        chunk = os.pread(fd, size - done, offset + done)
        if not chunk:
            break
        parts.append(chunk)
        done += len(chunk)
    return b"".join(parts)


def read_row(index: ShardIndex, row: int, files: OpenShards) -> bytes:
    """The encoded bytes of index line `row`, checked against the index's CRC-32."""
    k = int(index.shard[row])
    path = index.shard_path(k)
    offset, size = int(index.offset[row]), int(index.size[row])
    data = files.pread(path, size, offset)
    if len(data) != size:
        raise DataError(f"shard {path} is truncated: image {index.paths[row]} (bytes {offset}-{offset + size}) "
                        f"lies past its end; restore the shard or pack the data set again")
    if zlib.crc32(data) != int(index.crc[row]):
        raise DataError(f"shard {path} is damaged: image {index.paths[row]} (bytes {offset}-{offset + size}) "
                        f"does not match its checksum in {index.path}; restore the shard or pack again")
    return data


def member_header_problem(index: ShardIndex, row: int, files: OpenShards) -> str | None:
    """Why the tar header before image `row` does not describe it (an index of another packing),
    or None: the ustar magic and the member size must match the index line."""
    k = int(index.shard[row])
    offset, size = int(index.offset[row]), int(index.size[row])
    if offset < TAR_BLOCK:
        return f"image {index.paths[row]} starts at byte {offset}, inside the first tar header"
    head = files.pread(index.shard_path(k), TAR_BLOCK, offset - TAR_BLOCK)
    if len(head) < TAR_BLOCK or head[257:262] != b"ustar":
        return f"no tar header before image {index.paths[row]} (byte {offset})"
    try:
        recorded = int(head[124:136].rstrip(b"\0 ").decode() or "0", 8)
    except ValueError:
        return f"a damaged tar header before image {index.paths[row]} (byte {offset})"
    if recorded != size:
        return f"the tar member at byte {offset} has {recorded} bytes, the index says {size} for {index.paths[row]}"
    return None
