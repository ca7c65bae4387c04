"""Is a run directory usable? Created and probed for writing before anything is written to it.

A path that is a file, lies under a file, or sits in a read-only place is a `UserError`
(one line naming the path and why), never a traceback from deep inside the trainer.
"""
from __future__ import annotations

import os
from pathlib import Path

from simmatch.errors import UserError


def _existing_ancestor(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if parent.exists():
            return parent
    return Path("/")


def ensure_writable_dir(path: str | Path, key: str = "train.run_dir", create: bool = True) -> Path:
    """Create `path` (with parents) when `create`, then check that a file can be written there."""
    path = Path(path)
    where = f"{key}={path}"
    if path.exists() and not path.is_dir():
        raise UserError(f"{where} is a file, not a directory")
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        raise UserError(f"{where} lies under {ancestor}, which is a file, not a directory")
    if not path.exists():
        if not create:
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise UserError(f"{where} cannot be created: {ancestor} is not writable")
            return path
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{where} cannot be created in {ancestor}: "
                            f"{exc.strerror or type(exc).__name__}") from None
    probe = path / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{where} is not writable: {exc.strerror or type(exc).__name__}") from None
    return path
