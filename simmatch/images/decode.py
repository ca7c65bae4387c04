"""Does an image decode? One check for check_data, the start-up check, make_shards and the
error lines: a file or a source's image, in threads, with a progress line. No torch."""
from __future__ import annotations

import errno
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from simmatch.errors import DataError
from simmatch.images.source import FolderSource, ImageSource


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


class Progress:
    """A progress line on stderr while images are decoded: rewritten in place on a terminal, a
    line per tenth otherwise (logs of batch jobs stay short)."""

    def __init__(self, total: int, what: str = "decoded", stream=None) -> None:
        self.total, self.what, self.done = total, what, 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = self.shown_at = time.perf_counter()
        self.next_tenth = 1

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.tty and (now - self.shown_at >= 0.5 or self.done == self.total):
            self.stream.write(f"\r{self.line()}" + ("\n" if self.done == self.total else ""))
            self.stream.flush()
            self.shown_at = now
        elif not self.tty and self.total and self.done * 10 >= self.next_tenth * self.total:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self.next_tenth = self.done * 10 // self.total + 1

    def line(self) -> str:
        elapsed = max(1e-9, time.perf_counter() - self.started)
        pct = 100 * self.done // max(1, self.total)
        return f"{self.what} {self.done:,}/{self.total:,} images ({pct}%), {self.done / elapsed:,.0f} images/s"


def source_problem(source: ImageSource, rel: str, fast: bool = False) -> str | None:
    """image_problem of an image of `source`; bytes that cannot be read from a shard (damaged,
    truncated, missing: a DataError naming the shard) are this image's problem too."""
    try:
        encoded = source.open(rel)
    except DataError as exc:
        return str(exc)
    return image_problem(encoded, fast=fast)


def decode_all(source: ImageSource | Path, files: list[str], workers: int, fast: bool = False,
               progress: Progress | None = None, chunksize: int = 64) -> list[tuple[str, str]]:
    """(file, reason) of every file of `files` (relative to `source`, a folder or a shard set's split)
    that does not decode, decoded in `workers` threads (decoding releases the GIL), in order."""
    if isinstance(source, Path):
        source = FolderSource(source)
    problems = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = pool.map(lambda r: source_problem(source, r, fast), files, chunksize=chunksize)
        for rel, reason in zip(files, reasons):
            if reason is not None:
                problems.append((rel, reason))
            if progress is not None:
                progress.step()
    return problems


def find_undecodable(images: list[Path] | list[tuple[ImageSource, str]], threads: int = 4) -> list[tuple[str, str]]:
    """(where, reason) of every image that does not decode: files, or (source, relative path)
    pairs (Streams.check_files). JPEGs at 1/8 scale, in `threads` threads (decoding releases the GIL)."""
    pairs = [item if isinstance(item, tuple) else (FolderSource(Path()), str(item)) for item in images]

    def problem(pair: tuple[ImageSource, str]) -> tuple[str, str | None]:
        source, rel = pair
        return source.where(rel), source_problem(source, rel, fast=True)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        found = list(pool.map(problem, pairs, chunksize=16))
    return [(where, reason) for where, reason in found if reason is not None]


def raise_if_undecodable(problems: list[tuple[str, str]], what: str, show: int = 3) -> None:
    """One line naming the first `show` bad files (0: every one), their count and the tool that
    lists them all."""
    if not problems:
        return
    problems = sorted(problems)
    show = show or len(problems)
    shown = "; ".join(f"{p} ({r})" for p, r in problems[:show])
    more = f" and {len(problems) - show} more" if len(problems) > show else ""
    raise DataError(f"{len(problems)} {what} cannot be decoded: {shown}{more} "
                    f"(tools/check_data.py DATA_ROOT lists every bad file)")
