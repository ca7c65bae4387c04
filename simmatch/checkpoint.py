"""Checkpoints: atomic writes, the last N kept, the newest loadable one found on restart.

A checkpoint is written to a temporary file in the same directory and renamed over its
final name (os.replace is atomic on POSIX), so a crash or kill mid-write never leaves a
half-written `ckpt_*.pt`. Loading uses torch.load(weights_only=True): no arbitrary objects
are ever unpickled.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from simmatch.errors import CheckpointError

log = logging.getLogger(__name__)
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")
LAST, BEST, BEST_RECORD = "last.pt", "best.pt", "best.json"  # stable names next to the ckpt_*.pt


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def atomic_torch_save(obj: Any, path: Path) -> None:
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def load(path: str | Path) -> dict:
    """Load a checkpoint on the CPU without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, or holding non-tensor objects
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict")
    return state


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """(iteration, path) of every finished checkpoint, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def load_newest_valid(ckpt_dir: str | Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads; a corrupt newer one is reported and skipped."""
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return path, load(path)
        except CheckpointError as exc:
            log.warning("skipping unusable checkpoint: %s", exc)
    return None


def resolve(path: str | Path) -> Path:
    """A checkpoint file, the newest checkpoint of a run directory, or `.../ckpt_300.pt`: the
    checkpoint of iteration 300 (files are named with zero-padded iterations)."""
    path = Path(path)
    if path.is_file():  # last.pt is a symlink: name the checkpoint it points at
        return path.resolve() if path.is_symlink() else path
    m = _NAME.match(path.name)
    if m and not path.exists():
        have = list_checkpoints(path.parent)
        for iteration, p in have:
            if iteration == int(m.group(1)):
                return p
        raise CheckpointError(f"no checkpoint of iteration {int(m.group(1))} in {path.parent} (it has "
                              f"{', '.join(str(i) for i, _ in have) or 'none'})")
    for candidate in (path / "checkpoints", path):
        found = list_checkpoints(candidate)
        if found:
            return found[-1][1]
    raise CheckpointError(f"no checkpoint found at {path}")


def point_last_at(path: Path) -> None:
    """Make `last.pt` a relative symlink to `path`, replacing the old link atomically."""
    link = path.parent / LAST
    tmp = path.parent / f".{LAST}.{os.getpid()}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(path.name, tmp)
    os.replace(tmp, link)


def best_record(ckpt_dir: str | Path) -> dict | None:
    """What `best.pt` holds: {metric, value, iteration}, or None before the first evaluation."""
    path = Path(ckpt_dir) / BEST_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pick(source: str | Path, which: str = "last") -> Path:
    """The checkpoint a tool reads: a file as given; in a run directory `last` (the newest
    valid recovery checkpoint) or `best` (the best validation top-1 so far)."""
    source = Path(source)
    if which not in ("last", "best"):
        raise CheckpointError(f"--which-ckpt must be best or last, not {which!r}")
    if source.is_file() or which == "last":
        return resolve(source)
    for ckpt_dir in (source / "checkpoints", source):
        if (ckpt_dir / BEST).is_file():
            return ckpt_dir / BEST
    raise CheckpointError(f"no best checkpoint in {source} (best.pt is written at each evaluation "
                          f"that improves validation top-1)")


def to_cpu(obj: Any) -> Any:
    """A deep copy with every tensor on the CPU, safe to write while training goes on."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


class CheckpointSaver:
    """Writes `ckpt_{iteration}.pt` and prunes all but the newest `keep`.

    With `background=True` the file is written by a thread after the state has been copied
    to the host, so training stalls only for the copy. `wait()` joins the pending write.
    """

    def __init__(self, ckpt_dir: str | Path, keep: int = 3, background: bool = True):
        self.dir = Path(ckpt_dir)
        self.keep = keep
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_stall_s = 0.0
        self.last_write_s = 0.0

    def path_for(self, iteration: int) -> Path:
        return self.dir / f"ckpt_{iteration:09d}.pt"

    def save(self, state: dict, iteration: int) -> Path:
        t0 = time.perf_counter()
        self.wait()
        host_state = to_cpu(state)
        path = self.path_for(iteration)
        self.last_stall_s = time.perf_counter() - t0
        if self.background:
            self._thread = threading.Thread(target=self._write, args=(host_state, path), daemon=False)
            self._thread.start()
        else:
            self._write(host_state, path)
            self._raise_pending()
        return path

    def _write(self, state: dict, path: Path) -> None:
        t0 = time.perf_counter()
        try:
            atomic_torch_save(state, path)
            if _NAME.match(path.name):  # a recovery checkpoint: `last` follows it, old ones go
                point_last_at(path)
                self._prune()
        except BaseException as exc:  # surfaced by wait()
            self._error = exc
        self.last_write_s = time.perf_counter() - t0

    def save_best(self, state: dict, record: dict) -> Path:
        """Write `best.pt` (the whole training state at the best evaluation, never pruned) and
        then `best.json` describing it; both atomically, in the writer thread like `save`."""
        t0 = time.perf_counter()
        self.wait()
        host_state = to_cpu(state)
        self.last_stall_s = time.perf_counter() - t0

        def write() -> None:
            self._write(host_state, self.dir / BEST)
            if self._error is None:
                atomic_write_text(self.dir / BEST_RECORD, json.dumps(record) + "\n")

        if self.background:
            self._thread = threading.Thread(target=write, daemon=False)
            self._thread.start()
        else:
            write()
            self._raise_pending()
        return self.dir / BEST

    def _prune(self) -> None:
        for _, old in list_checkpoints(self.dir)[:-self.keep]:
            try:
                old.unlink()
            except FileNotFoundError:
                pass

    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointError(f"writing a checkpoint into {self.dir} failed: {err}")

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_pending()
