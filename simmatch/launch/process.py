"""How a command-line process starts and ends, cheaply.

Importing torch and torchvision creates about a million Python objects (torchvision pulls in
torch._dynamo). The interpreter's cyclic collector then walks them all again at every full
collection while the process trains, and at exit it tears every module down one object at a
time: 1.5-2 s of CPU per process on this project's 2-core machine, paid by every rank of every
run and by every tool (docs/PERFORMANCE.md, "Process start and exit"). `run_cli` imports the
heavy modules with the collector off and freezes what they made, and ends the process the way
the interpreter would, without the teardown: the main function's result or SystemExit becomes
the exit status, non-daemon threads (a checkpoint still being written) are joined, the atexit
handlers run (log files, DataLoader workers, DALI's generated sources), stdout and stderr are
flushed, then `os._exit`.
"""
from __future__ import annotations

import atexit
import gc
import importlib
import os
import sys
import threading
from collections.abc import Callable, Iterable
from typing import NoReturn


def preload(modules: Iterable[str]) -> None:
    """Import `modules` with the cyclic collector off, then move everything they made to the
    collector's permanent generation (gc.freeze): objects that live as long as the process."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        for name in modules:
            importlib.import_module(name)
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def exit_status(code: object) -> int:
    """sys.exit's rules: None is 0, an int is itself, anything else is printed and is 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass


def end_process(code: object) -> NoReturn:
    """Exit with `code` after what a normal exit does that matters, skipping the module teardown."""
    status = exit_status(code)
    me = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not me and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    _flush()
    os._exit(status)


def run_cli(main: Callable[[], int | None], heavy: Iterable[str] = ()) -> NoReturn:
    """The `if __name__ == "__main__"` of a command-line entry point: `main()`'s result (or its
    SystemExit) is the exit status. Any other exception ends the process as usual (traceback)."""
    preload(heavy)
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code
    end_process(code)
