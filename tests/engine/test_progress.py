"""The terminal: on a TTY a per-step tqdm bar with ETA sized to the terminal, an evaluation bar,
log lines on lines of their own above the bar; without a TTY (SLURM logs) no bar at all."""
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest

from conftest import ROOT, call_tool, tiny_overrides

pytestmark = pytest.mark.timeout(900)  # two runs; minutes on a loaded 2-core machine

COLUMNS = 90


def run_on_pty(args: list[str], timeout: float = 400) -> str:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, COLUMNS, 0, 0))
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdin=slave, stdout=slave, stderr=subprocess.PIPE,
                            env=dict(os.environ, COLUMNS=str(COLUMNS)))
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=timeout)
    os.close(master)
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_bar_on_a_terminal_and_plain_lines_elsewhere(digits_root, tmp_path):
    args = ["tools/train.py", "--cfg", "yaml/digits.yaml",
            *tiny_overrides(digits_root, tmp_path / "tty", **{"optim.iters": 4, "train.log_every": 2,
                                                             "data.val_batch": 128})]
    out = run_on_pty(args)
    segments = [s for s in re.split(r"[\r\n]", out) if s.strip()]
    strip = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
    segments = [strip.sub("", s) for s in segments]
    bars = [s for s in segments if s.startswith("train:")]
    assert any("4/4" in s and "<00:00" in s for s in bars), bars[-3:]  # per-step bar with ETA
    assert any(re.search(r"train: +\d+%\|.*\| 1/4", s) for s in bars)  # moves every step, not every log_every
    assert all(len(s) <= COLUMNS for s in bars), max(bars, key=len)  # the terminal's width
    assert any(s.startswith("eval teacher:") for s in segments)  # the evaluation has its own bar
    # the log lines (every log_every) stand alone, not glued onto the bar
    logged = [s for s in segments if re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d it \d/4 ", s)]
    assert [s.split(" it ")[1].split()[0] for s in logged] == ["2/4", "4/4"]

    res = call_tool(*[a.replace(str(tmp_path / "tty"), str(tmp_path / "pipe")) for a in args])  # not a TTY
    assert res.returncode == 0, res.stderr[-3000:]
    assert "\r" not in res.stdout and "train:" not in res.stdout and "eval teacher:" not in res.stdout
    assert [line.split(" it ")[1].split()[0] for line in res.stdout.splitlines()
            if re.match(r"\S+ \S+ it \d/4 ", line)] == ["2/4", "4/4"]


def test_children_get_omp_threads_like_torchrun():
    from simmatch.launch.local import child_env

    cores = len(os.sched_getaffinity(0))
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    for nproc in (1, 2, 3, 64):
        env = child_env(base, 1, nproc, 1234)
        assert env["OMP_NUM_THREADS"] == str(max(1, cores // nproc))
        assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_PORT"]) == ("1", str(nproc), "1234")
    assert child_env({**base, "OMP_NUM_THREADS": "7"}, 0, 2, 1)["OMP_NUM_THREADS"] == "7"  # the user's choice
