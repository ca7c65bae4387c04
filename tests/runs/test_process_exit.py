"""simmatch/process.py: a command-line process ends as the interpreter would end it (its status,
its threads, its atexit handlers, its buffered output), without the module teardown."""
from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from simmatch.launch.process import exit_status, preload

ROOT = Path(__file__).resolve().parents[2]


def test_exit_status_follows_sys_exit(capsys):
    assert exit_status(None) == 0 and exit_status(0) == 0 and exit_status(3) == 3
    assert exit_status("stopped: bad input") == 1
    assert capsys.readouterr().err == "stopped: bad input\n"


def test_preload_imports_and_freezes():
    sys.modules.pop("colorsys", None)
    before = gc.get_freeze_count()
    try:
        preload(["colorsys"])
        assert "colorsys" in sys.modules and gc.isenabled()
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()


def _run(body: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "entry.py"
    script.write_text(textwrap.dedent(f"""\
        import atexit, sys, threading, time
        sys.path.insert(0, {str(ROOT)!r})
        from simmatch.launch.process import run_cli
        OUT = {str(tmp_path)!r}
        """) + textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)


@pytest.mark.slow  # starts Python processes
def test_a_finished_main_joins_threads_runs_atexit_and_flushes(tmp_path):
    res = _run("""
        def late():
            time.sleep(0.3)
            open(OUT + "/thread.txt", "w").write("written")

        def main():
            threading.Thread(target=late).start()  # a checkpoint still being written
            atexit.register(lambda: open(OUT + "/atexit.txt", "w").write("ran"))
            sys.stdout.write("buffered, no newline")
            return 5

        if __name__ == "__main__":
            run_cli(main, heavy=("json",))
        """, tmp_path)
    assert res.returncode == 5, res.stderr
    assert res.stdout == "buffered, no newline"
    assert (tmp_path / "thread.txt").read_text() == "written"
    assert (tmp_path / "atexit.txt").read_text() == "ran"


@pytest.mark.slow  # starts Python processes
def test_system_exit_and_errors_keep_their_status(tmp_path):
    res = _run("""
        def main():
            sys.exit("error: one line")

        run_cli(main)
        """, tmp_path)
    assert (res.returncode, res.stderr) == (1, "error: one line\n")
    res = _run("""
        def main():
            raise ValueError("not a user error")

        run_cli(main)
        """, tmp_path)
    assert res.returncode == 1 and "Traceback" in res.stderr and "ValueError: not a user error" in res.stderr
    res = _run("""
        def main():
            print("done")

        run_cli(main)
        """, tmp_path)
    assert (res.returncode, res.stdout) == (0, "done\n")
