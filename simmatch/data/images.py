"""Is this file a decodable image? One check shared by check_data and the error mapping."""
from __future__ import annotations

import errno
import re
from pathlib import Path

from simmatch.errors import DataError


def open_file_limit() -> str:
    """This process's soft limit on open files, as `ulimit -n` prints it."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return "unlimited" if soft == resource.RLIM_INFINITY else str(soft)


OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def problem_text(exc: BaseException) -> str:
    """A decoder's exception as a short reason: its first line, without the file it was given (the
    caller names the image; a Python object's repr, `<_io.BytesIO object at 0x7f...>`, names nothing)."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "cannot identify image file"
    text = OBJECT_REPR.sub("", (str(exc).splitlines() or [""])[0]).strip()
    return text or type(exc).__name__


def image_problem(path: str | Path, fast: bool = False) -> str | None:
    """None if `path` fully decodes as an image, else a short reason; a DataError only when the
    process has run out of file descriptors (no image is to blame then).

    `fast`: JPEGs are decoded at 1/8 scale (libjpeg's DCT scaling): every byte of the
    entropy-coded data is still read, so truncated and corrupt files are still caught, at a
    fraction of the cost (docs/RELIABILITY.md has the figures)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if fast and img.format == "JPEG":
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()  # a full decode: catches truncated and corrupt data, not only headers
            if img.width < 1 or img.height < 1:
                return "empty image"
    except FileNotFoundError:
        return "file not found"
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):  # not the image: this process may open no more files
            raise DataError(f"cannot open {path}: too many open files: the file-descriptor limit (ulimit -n "
                            f"{open_file_limit()}) is too low for the decoding threads; raise it "
                            f"(ulimit -n 4096) or lower data.num_threads") from None
        return problem_text(exc)
    except Exception as exc:  # PIL raises many types for bad data
        return problem_text(exc)
    return None
