"""Checkpoints: atomic writes with an integrity digest, the last N kept, the newest usable
one found on restart.

A checkpoint is written to a temporary file in the same directory (`.ckpt_*.tmp`, created
with the process's umask) while its SHA-256 is computed from the bytes written; after the
file is fsynced, the digest goes to a sidecar `ckpt_N.pt.sha256` (itself written
atomically, `sha256sum -c` reads it), and only then is the temporary file renamed over
`ckpt_N.pt`. So every `ckpt_N.pt` this code has produced has a digest of its exact bytes
next to it, and no torn write, kill or crash can leave a pair that matches by accident:
whatever changes the file afterwards (bit rot, a partial copy, a stray write) makes it
fail the check, and readers treat it as broken. Loading uses torch.load(weights_only=True):
no arbitrary objects are ever unpickled.

Checkpoints written before digests existed (`format` < 2, no sidecar) are still loaded,
with a warning that their integrity cannot be checked; a format-2 checkpoint whose sidecar
is missing is refused.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from simmatch.errors import CheckpointError

log = logging.getLogger(__name__)
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")
LAST, BEST, BEST_RECORD = "last.pt", "best.pt", "best.json"  # stable names next to the ckpt_*.pt
DIGEST_SUFFIX = ".sha256"
DIGEST_FORMAT = 2  # training checkpoints of this format or later must carry a digest
TMP_GLOB = ".*.tmp"  # what _open_tmp creates (.ckpt_*.tmp, .config.yaml.*.tmp, ...)


class DiskFullError(CheckpointError):
    """The file system ran out of space (or quota) while a checkpoint was written."""


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + DIGEST_SUFFIX)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter:
    """A write-only file wrapper that hashes what passes through it."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _open_tmp(path: Path) -> tuple[BinaryIO, Path]:
    """A new temporary file next to `path`; O_EXCL with mode 0666 so the umask applies
    (tempfile.mkstemp would force 0600, and a lab shares run directories)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    return os.fdopen(fd, "wb"), tmp


def _write_tmp(path: Path, write: Callable[[BinaryIO], None]) -> tuple[Path, str]:
    """Write and fsync a temporary file; its path and the SHA-256 of its bytes."""
    f, tmp = _open_tmp(path)
    try:
        with f:
            hw = _HashingWriter(f)
            write(hw)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink(tmp)
        raise
    return tmp, hw.sha.hexdigest()


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, sha = _write_tmp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return sha


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def atomic_torch_save(obj: Any, path: Path) -> None:
    """A plain atomic torch.save (exports, heads): no digest sidecar."""
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def _free_bytes(directory: Path) -> int | None:
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def state_nbytes(obj: Any) -> int:
    """The bytes of every tensor in a (nested) state: what a checkpoint file needs, roughly."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v) for v in obj)
    return 0


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _is_disk_full(exc: BaseException, directory: Path) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    free = _free_bytes(directory)  # torch's writer reports ENOSPC as "unexpected pos"
    return free is not None and free < 2**20


def save_checkpoint(state: dict, path: str | Path) -> str:
    """Write `path` and its digest sidecar (see the module docstring for the order); the digest.

    A full disk is reported as such (where, how much the checkpoint needs, how much was
    free); nothing of the failed write is left behind and older checkpoints are untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    free_before = _free_bytes(path.parent)
    tmp = None
    try:
        f, tmp = _open_tmp(path)
        with f:
            hw = _HashingWriter(f)
            torch.save(state, hw)
            f.flush()
            os.fsync(f.fileno())
        sha = hw.sha.hexdigest()
        atomic_write_text(digest_path(path), f"{sha}  {path.name}\n")
        os.replace(tmp, path)
    except BaseException as exc:
        full = isinstance(exc, Exception) and _is_disk_full(exc, path.parent)  # before the temp file goes
        if tmp is not None:
            _unlink(tmp)
        if full:
            raise DiskFullError(
                f"disk full: checkpoint {path} needs about {_mb(state_nbytes(state))}, "
                f"{path.parent} had {_mb(free_before or 0)} free; the previous checkpoint is kept") from None
        raise
    _fsync_dir(path.parent)
    return sha


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return sha.hexdigest()


def verify(path: str | Path) -> bool:
    """True when the file matches its digest sidecar, False when it has none;
    CheckpointError when it does not match (a damaged file)."""
    path = Path(path).resolve()  # last.pt is a symlink: the digest sits beside its target
    side = digest_path(path)
    try:
        recorded = side.read_text().split()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read its digest {side.name}: {exc}") from None
    if not recorded or not re.fullmatch(r"[0-9a-f]{64}", recorded[0]):
        raise CheckpointError(f"checkpoint {path} is damaged: its digest file {side.name} is malformed")
    if file_sha256(path) != recorded[0]:
        raise CheckpointError(f"checkpoint {path} is damaged: its SHA-256 does not match {side.name}")
    return True


def usability(path: str | Path) -> str:
    """'ok', 'no digest (...)' or 'damaged: ...' for status: the digest check, and for a file
    without a digest its format (read through mmap, so the tensors are not read)."""
    try:
        if verify(path):
            return "ok"
    except CheckpointError as exc:
        return f"damaged: {str(exc).split(': ', 1)[-1]}"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return "damaged: cannot be loaded"
    if isinstance(state, dict) and isinstance(state.get("format"), int) and state["format"] >= DIGEST_FORMAT:
        return f"damaged: its digest file {digest_path(Path(path).resolve()).name} is missing"
    return "no digest (written before checkpoints carried one; loaded unchecked)"


def load(path: str | Path) -> dict:
    """Load a checkpoint on the CPU after checking its digest, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    checked = verify(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, or holding non-tensor objects
        text = str(exc)
        if "Weights only load failed" in text or "weights_only" in text:
            raise CheckpointError(f"checkpoint {path} holds objects other than tensors and plain "
                                  f"containers; refusing to unpickle it") from None
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {text.splitlines()[0] if text else type(exc).__name__}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict")
    if not checked and isinstance(state.get("format"), int) and state["format"] >= DIGEST_FORMAT:
        raise CheckpointError(f"checkpoint {path} has no digest file {digest_path(path.resolve()).name}: "
                              f"its integrity cannot be checked")
    if not checked and "method" in state:
        log.warning("checkpoint %s has no digest (written before checkpoints carried one): "
                    "loaded without an integrity check", path)
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
    """The newest checkpoint that verifies and loads; a broken newer one is named and skipped."""
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return path, load(path)
        except CheckpointError as exc:
            log.warning("skipping unusable checkpoint: %s", exc)
    return None


def _checkpoint_dir(path: Path) -> Path | None:
    for candidate in (path / "checkpoints", path):
        if list_checkpoints(candidate):
            return candidate
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


def load_resolved(path: str | Path) -> tuple[Path, dict]:
    """A named checkpoint file (an error names it when broken), or the newest usable checkpoint
    of a run directory (broken newer ones are named and skipped)."""
    path = Path(path)
    if path.is_file() or not path.is_dir():
        file = resolve(path)
        return file, load(file)
    found = _checkpoint_dir(path)
    if found is None:
        raise CheckpointError(f"no checkpoint found at {path}")
    loaded = load_newest_valid(found)
    if loaded is None:
        raise CheckpointError(f"no usable checkpoint in {found}: every one is damaged or unreadable")
    return loaded


def remove_leftovers(*dirs: str | Path) -> list[tuple[Path, int]]:
    """Remove the temporary files of a writer that died mid-write and digests without their
    checkpoint; (path, size) of each. Call only while holding the run directory's lock, so
    that no live writer's file goes."""
    found: list[Path] = []
    for d in map(Path, dirs):
        if d.is_dir():
            found += list(d.glob(TMP_GLOB))
            found += [p for p in d.glob("ckpt_*.pt" + DIGEST_SUFFIX) if not p.with_suffix("").exists()]
    removed = []
    for p in found:
        try:
            size = p.lstat().st_size  # a leftover may be a dangling symlink (.last.pt.*.tmp)
            p.unlink()
        except FileNotFoundError:
            continue
        removed.append((p, size))
    return removed


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


def load_picked(source: str | Path, which: str = "last") -> tuple[Path, dict]:
    """`pick`, then load: in a run directory `last` falls back past damaged checkpoints (each
    named in a warning); a file, or `best`, that fails its check is an error naming it."""
    source = Path(source)
    if which == "last" and source.is_dir():
        return load_resolved(source)
    file = pick(source, which)
    return file, load(file)


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
            save_checkpoint(state, path)
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
            _unlink(old)
            _unlink(digest_path(old))

    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, CheckpointError):
                raise err
            raise CheckpointError(f"writing a checkpoint into {self.dir} failed: {err}")

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_pending()
