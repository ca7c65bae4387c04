"""Atomic files: written under a temporary name beside the target, fsynced, then renamed.

Every file this project writes into a run directory or an export is made here, through one
temporary naming (`.NAME.PID.RANDOM.tmp`, created with O_EXCL and mode 0666 so the umask
applies: a lab shares run directories, and tempfile.mkstemp would force 0600). A kill at any
moment leaves the previous file whole and, at worst, a temporary file that `RunDir.remove_leftovers`
removes under the run directory's lock. The SHA-256 of the bytes is computed while they are
written, so a digest never needs a second read. No torch here.
"""
from __future__ import annotations

import errno
import hashlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TMP_GLOB = ".*.tmp"  # every temporary file made by `temporary_path`
DIGEST_SUFFIX = ".sha256"


def digest_path(path: Path) -> Path:
    """The digest sidecar of `path` (`sha256sum -c` reads it)."""
    return path.with_name(path.name + DIGEST_SUFFIX)


def temporary_path(path: Path) -> Path:
    """A fresh temporary name in `path`'s directory; `TMP_GLOB` matches it (rundir.RunDir.remove_leftovers)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def unlink_quiet(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class HashingWriter:
    """A write-only file wrapper that hashes what passes through it."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def write_atomic(path: Path, write: Callable[[BinaryIO], None],
                 before_rename: Callable[[str], None] | None = None,
                 on_failure: Callable[[BaseException], BaseException | None] | None = None) -> str:
    """Write `path` through `write(file)`: to a temporary file, fsynced, then `before_rename(sha)`
    (a checkpoint's digest sidecar goes there), then renamed over `path`. Returns the SHA-256 of
    the bytes written. On any failure the temporary file is removed and `path` is untouched;
    `on_failure(exc)`, called while the temporary file still exists (a full disk is judged by
    what is free then), may return the exception to raise instead."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            hashing = HashingWriter(f)
            write(hashing)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        sha = hashing.sha.hexdigest()
        if before_rename is not None:
            before_rename(sha)
        os.replace(tmp, path)
    except BaseException as exc:
        replacement = on_failure(exc) if on_failure is not None else None
        unlink_quiet(tmp)
        if replacement is not None:
            raise replacement from None
        raise
    fsync_dir(path.parent)
    return sha


def atomic_write_text(path: Path, text: str) -> None:
    write_atomic(Path(path), lambda f: f.write(text.encode()))


def replace_symlink(link: Path, target_name: str) -> None:
    """Make `link` a relative symlink to `target_name` (in its directory), atomically."""
    tmp = temporary_path(link)
    os.symlink(target_name, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        unlink_quiet(tmp)
        raise


def replace_together(paths: list[Path], write: Callable[[list[Path]], None],
                     check: Callable[[list[Path]], bool]) -> bool:
    """Write several files under temporary names (`write(tmps)`), check them together
    (`check(tmps)`), and rename them into place only when the check passes; nothing is left
    behind otherwise. True when they were renamed."""
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmps = [temporary_path(path) for path in paths]
    try:
        write(tmps)
        if not check(tmps):
            return False
        for tmp, path in zip(tmps, paths):
            os.replace(tmp, path)
        return True
    finally:
        for tmp in tmps:
            unlink_quiet(tmp)


def file_sha256(path: Path, step: Callable[[int], None] | None = None) -> str:
    """The SHA-256 of a file's bytes; `step(n)` after every n bytes read (a progress line)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
            if step is not None:
                step(len(chunk))
    return sha.hexdigest()


def free_bytes(directory: Path) -> int | None:
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def is_disk_full(exc: BaseException, directory: Path) -> bool:
    """Did `exc` come from a full disk or quota (also when a writer wrapped the ENOSPC)?"""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    free = free_bytes(directory)  # torch's writer reports ENOSPC as "unexpected pos"
    return free is not None and free < 2**20
