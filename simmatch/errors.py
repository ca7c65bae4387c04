"""User-facing errors: reported as one line and a non-zero exit, never a traceback."""
from __future__ import annotations

import errno
import functools
import io
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar


class UserError(Exception):
    """Bad input from the user (config, paths, data, checkpoints): one clear line."""


class ConfigError(UserError):
    """A config key, value or file is wrong."""


class DataError(UserError):
    """A data directory, split file or image is missing, unreadable or corrupt."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt or belongs to another architecture."""


class ImageError(DataError):
    """An image that cannot be read or decoded. `rel` is its path as the split lists name it
    (relative to the split's folder), kept beside the message so that nothing parses it back
    out of the text (a name may hold ': ' or anything else)."""

    def __init__(self, message: str, rel: str) -> None:
        super().__init__(message)
        self.rel = rel


def descriptor_limit(exc: BaseException) -> UserError | None:
    """The one line for an error caused by this process's open-file limit (EMFILE / ENFILE, or an
    import that failed on it), else None: too few descriptors must not be blamed on a file or a
    package."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.EMFILE, errno.ENFILE) or \
                isinstance(seen, ImportError) and "too many open files" in str(seen).lower():
            import resource

            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            shown = "unlimited" if soft == resource.RLIM_INFINITY else str(soft)
            return UserError(f"too many open files: the file-descriptor limit (ulimit -n {shown}) is too low for "
                             f"this run; raise it (ulimit -n 4096) or lower data.num_threads")
        seen = seen.__cause__ or seen.__context__
    return None


F = TypeVar("F", bound=Callable[..., int | None])


class ClosedPipeSafe:
    """stdout that goes on silently once its reader has gone (`tools/submit.py ... | head -1`): the
    tool finishes its work (a submission included) instead of dying of BrokenPipeError."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.reader_gone = False

    def write(self, text: str) -> int:
        if not self.reader_gone:
            try:
                return self.stream.write(text)
            except BrokenPipeError:
                self._gone()
        return len(text)

    def flush(self) -> None:
        if not self.reader_gone:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._gone()

    def _gone(self) -> None:
        """From now on write nowhere; the descriptor too, so the exit's final flush is quiet."""
        self.reader_gone = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def cli_errors(main: F) -> F:
    """Turn a UserError escaping a command-line entry point into `error: ...` and exit 2; a
    reader of stdout that goes away (a closed pipe) is not an error."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        previous = sys.stdout
        if not isinstance(previous, ClosedPipeSafe):
            sys.stdout = ClosedPipeSafe(previous)
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except (OSError, ImportError) as exc:
            limit = descriptor_limit(exc)
            if limit is None:
                raise
            print(f"error: {limit}", file=sys.stderr)
            sys.exit(2)
        finally:
            sys.stdout.flush()
            sys.stdout = previous

    return wrapper  # type: ignore[return-value]
