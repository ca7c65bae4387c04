"""Checkpoints: written atomically with an integrity digest, read back only when they match it.

A checkpoint is written to a temporary file in the same directory (files/atomic.py) while
its SHA-256 is computed from the bytes written; after the file is fsynced, the digest goes to a
sidecar `ckpt_N.pt.sha256` (itself written atomically, `sha256sum -c` reads it), and only then
is the temporary file renamed over `ckpt_N.pt`. No name is rewritten: `best.pt` and its
`best.pt.sha256` are links to the newest `best_<iteration>.pt` and its digest
(checkpoint/saver.py); a sidecar that older versions wrote while rewriting best.pt in place may
still list two digests (either matching file is whole). So every checkpoint this code has
produced has a digest of its exact bytes next to it, and no torn write, kill or crash can leave
a pair that fails or matches by accident: whatever changes the file afterwards (bit rot, a
partial copy, a stray write) makes it fail the check, and readers treat it as broken. Loading
uses torch.load(weights_only=True): no arbitrary objects are ever unpickled.

Two ways to read: `read_checkpoint(file)` (one file, an error naming it when it is broken) and
`find_checkpoint(source, which)` (a run directory's newest usable checkpoint, falling back past
damaged ones with a warning each, its best one, or a file named by path or by iteration).

Checkpoints written before digests existed (`format` < 2, no sidecar) are still loaded, with a
warning that their integrity cannot be checked; a format-2 checkpoint whose sidecar is missing
is refused.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from simmatch.errors import CheckpointError
from simmatch.files.atomic import (
    atomic_write_text,
    digest_path,
    file_sha256,
    free_bytes,
    is_disk_full,
    write_atomic,
)
from simmatch.run.rundir import BEST, BEST_RECORD, RunDir, checkpoint_iteration, list_checkpoints

log = logging.getLogger(__name__)
FORMAT = 2  # 2: written with a digest sidecar, which readers then require of it


class DiskFullError(CheckpointError):
    """The file system ran out of space (or quota) while a checkpoint was written."""


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


def save_checkpoint(state: dict, path: str | Path) -> str:
    """Write `path` and its digest sidecar (see the module docstring for the order); the digest.

    A full disk is reported as such (where, how much the checkpoint needs, how much was
    free); nothing of the failed write is left behind and older checkpoints are untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    free_before = free_bytes(path.parent)

    def digest(sha: str) -> None:
        atomic_write_text(digest_path(path), f"{sha}  {path.name}\n")

    def disk_full(exc: BaseException) -> BaseException | None:
        if isinstance(exc, Exception) and is_disk_full(exc, path.parent):
            return DiskFullError(f"disk full: checkpoint {path} needs about {_mb(state_nbytes(state))}, "
                                 f"{path.parent} had {_mb(free_before or 0)} free; the previous checkpoint is kept")
        return None

    return write_atomic(path, lambda f: torch.save(state, f), before_rename=digest, on_failure=disk_full)


def verify(path: str | Path) -> bool:
    """True when the file matches its digest sidecar, False when it has none;
    CheckpointError when it does not match (a damaged file)."""
    path = Path(path).resolve()  # last.pt is a symlink: the digest sits beside its target
    side = digest_path(path)
    try:
        lines = [ln.split() for ln in side.read_text().splitlines() if ln.strip()]
    except FileNotFoundError:
        return False
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read its digest {side.name}: {exc}") from None
    recorded = [ln[0] for ln in lines]
    if not recorded or len(recorded) > 2 or not all(re.fullmatch(r"[0-9a-f]{64}", d) for d in recorded):
        raise CheckpointError(f"checkpoint {path} is damaged: its digest file {side.name} is malformed")
    if file_sha256(path) not in recorded:  # two digests: a rewrite was interrupted, either file is whole
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
    if isinstance(state, dict) and isinstance(state.get("format"), int) and state["format"] >= FORMAT:
        return f"damaged: its digest file {digest_path(Path(path).resolve()).name} is missing"
    return "no digest (written before checkpoints carried one; loaded unchecked)"


def read_checkpoint(path: str | Path) -> dict:
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
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {reason}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict")
    if not checked and isinstance(state.get("format"), int) and state["format"] >= FORMAT:
        raise CheckpointError(f"checkpoint {path} has no digest file {digest_path(path.resolve()).name}: "
                              f"its integrity cannot be checked")
    if not checked and "method" in state:
        log.warning("checkpoint %s has no digest (written before checkpoints carried one): "
                    "loaded without an integrity check", path)
    return state


def _checkpoint_dir(source: Path) -> Path | None:
    """RUN_DIR/checkpoints, or `source` itself, whichever holds recovery checkpoints."""
    return next((d for d in (RunDir(source).checkpoints, source) if list_checkpoints(d)), None)


def _named_file(source: Path, which: str) -> Path:
    """The file a tool asked for: a file as given (a symlink such as last.pt names its target),
    `.../ckpt_300.pt` the checkpoint of iteration 300 however its name is padded, or a run
    directory's best.pt."""
    if source.is_file():
        return source.resolve() if source.is_symlink() else source
    iteration = checkpoint_iteration(source.name)
    if iteration is not None and not source.exists():
        have = list_checkpoints(source.parent)
        for it, p in have:
            if it == iteration:
                return p
        raise CheckpointError(f"no checkpoint of iteration {iteration} in {source.parent} (it has "
                              f"{', '.join(str(i) for i, _ in have) or 'none'})")
    if which == "best":
        for ckpt_dir in (RunDir(source).checkpoints, source):
            if (ckpt_dir / BEST).is_file():
                return ckpt_dir / BEST
        raise CheckpointError(f"no best checkpoint in {source} (best.pt is written at each evaluation "
                              f"that improves validation top-1)")
    raise CheckpointError(f"no checkpoint found at {source}")


def find_checkpoint(source: str | Path, which: str = "last", required: bool = True) -> tuple[Path, dict] | None:
    """The checkpoint a run or a tool reads, loaded: in a run directory (or its checkpoints/) the
    newest recovery checkpoint that passes its check (`last`; a damaged newer one is named in a
    warning and skipped) or best.pt (`best`); a file named by path, or by iteration
    (`.../ckpt_300.pt`), which must pass. Not `required`: None where there is nothing usable
    (a run that starts afresh) instead of a CheckpointError."""
    source = Path(source)
    if which not in ("last", "best"):
        raise CheckpointError(f"--which-ckpt must be best or last, not {which!r}")
    if which == "last" and (source.is_dir() or not source.exists() and not required):
        ckpt_dir = _checkpoint_dir(source) if source.is_dir() else None
        for _, path in reversed(list_checkpoints(ckpt_dir) if ckpt_dir else []):
            try:
                return path, read_checkpoint(path)
            except CheckpointError as exc:
                log.warning("skipping unusable checkpoint: %s", exc)
        if not required:
            return None
        raise CheckpointError(f"no usable checkpoint in {ckpt_dir}: every one is damaged or unreadable"
                              if ckpt_dir else f"no checkpoint found at {source}")
    file = _named_file(source, which)
    return file, read_checkpoint(file)


def run_config(run_dir: str | Path) -> tuple[dict | None, str]:
    """The config a run directory was trained with and where it was read: config.yaml (checked:
    read_run_config), or, when that file is missing, the config embedded in its newest usable
    checkpoint; (None, "") for a directory with neither."""
    from simmatch.config import with_defaults

    rd = RunDir(run_dir)
    saved = rd.saved_config()
    if saved is not None:
        return saved, str(rd.config)
    found = find_checkpoint(rd.root, required=False) if rd.has_checkpoints() else None
    if found is None or not found[1].get("config"):
        return None, ""
    return with_defaults(found[1]["config"]), f"the config inside {found[0]} ({rd.config} is missing)"


def best_record(ckpt_dir: str | Path) -> dict | None:
    """What `best.pt` holds: {metric, value, iteration, by (teacher or student: train.best_by; absent
    in a run written before it)}, or None before the first evaluation."""
    path = Path(ckpt_dir) / BEST_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def to_cpu(obj: Any) -> Any:
    """A deep copy with every tensor on the CPU, safe to write while training goes on."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


