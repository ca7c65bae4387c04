"""Every tool exits quietly when the reader of its output goes away (`tool | head -1`): status 0,
no traceback, and the work done anyway (`submit.py ... | head -1` used to die of BrokenPipeError
before submitting)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # a command line each


def first_line_then_close(*args: str) -> tuple[int, str]:
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # what `| head -1` does after its line
    err = proc.stderr.read().decode()
    return proc.wait(timeout=300), err


@pytest.mark.parametrize("args", [
    ["tools/submit.py", "--cfg", "yaml/in1k_1pct.yaml", "--nodes", "4", "--dry-run"],
    ["tools/train.py", "--cfg", "yaml/in1k_1pct_v2.yaml", "--print-config", "--world-size", "8"],
    ["tools/check_data.py", "DIGITS"],
], ids=["submit", "train", "check_data"])
def test_a_closed_pipe_is_not_an_error(args, digits_root):
    args = [str(digits_root) if a == "DIGITS" else a for a in args]
    code, err = first_line_then_close(*args)
    assert code == 0 and "Traceback" not in err and "BrokenPipe" not in err, (code, err)
