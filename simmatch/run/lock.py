"""One writer per run directory: `RUN_DIR/.lock`, held with flock by the writing process.

The process that writes a run directory (rank 0 of a training) holds an exclusive flock on
`RUN_DIR/.lock` for as long as it runs and writes its host and pid into the file. The
kernel drops the lock when the process dies, however it dies, so a dead holder never
blocks a new run; the file's content then still names it, which is how a new holder sees
that the previous one ended without releasing (and that its temporary files are leftovers).
A second writer is refused with one line naming the holder.

On NFS, flock is emulated with POSIX byte-range locks (Linux >= 2.6.12) and works between
clients when the server supports locking (NFSv4, or NFSv3 with lockd); a client that
crashes holds its lock until the server's lease expires (90 s by default on NFSv4). File
systems mounted with `nolock`/`local_lock=all` give each client its own lock: there, the
lock protects only against a second writer on the same machine.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from simmatch.errors import UserError
from simmatch.run.rundir import RunDir


class RunLocked(UserError):
    """Another live process writes this run directory."""


def _holder_text(text: str) -> str:
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    if "host" in fields and "pid" in fields:
        return f"pid {fields['pid']} on {fields['host']}"
    return "another process"


class RunLock:
    """An exclusive, non-blocking flock on RUN_DIR/.lock; `previous` names an unclean holder."""

    def __init__(self, run_dir: str | Path):
        self.path = RunDir(run_dir).lock
        self._fd: int | None = None
        self.previous: str | None = None  # the holder that died without releasing, if any

    def acquire(self, wait_s: float = 2.0) -> RunLock:
        """Take the lock or raise RunLocked naming the holder. Retries for `wait_s` seconds:
        a status query holds the lock for an instant."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    text = os.pread(fd, 4096, 0).decode(errors="replace")
                    os.close(fd)
                    raise RunLocked(f"run directory {self.path.parent} is in use by "
                                    f"{_holder_text(text)} (lock {self.path}); one writer per run "
                                    f"directory") from None
                time.sleep(0.1)
        old = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        self.previous = _holder_text(old) if old else None
        me = f"host={socket.gethostname()} pid={os.getpid()} since={time.strftime('%Y-%m-%dT%H:%M:%S')}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Clear the holder's name (a clean exit) and drop the lock."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder(run_dir: str | Path) -> str | None:
    """Who holds the run directory's lock now ('pid P on HOST'), or None when nobody does."""
    path = RunDir(run_dir).lock
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file (never written), or not readable by this user
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_text(os.pread(fd, 4096, 0).decode(errors="replace"))
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
