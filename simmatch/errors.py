"""User-facing errors: reported as one line and a non-zero exit, never a traceback."""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar


class UserError(Exception):
    """Bad input from the user (config, paths, data, checkpoints): one clear line."""


class ConfigError(UserError):
    """A config key, value or file is wrong."""


class DataError(UserError):
    """A data directory, split file or image is missing, unreadable or corrupt."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt or belongs to another architecture."""


F = TypeVar("F", bound=Callable[..., int | None])


def cli_errors(main: F) -> F:
    """Turn a UserError escaping a command-line entry point into `error: ...` and exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
