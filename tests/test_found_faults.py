"""Faults that attacks on the tools found, each reproduced as it was found: a run directory's
contents tampered with or damaged by hand, and what the tools must say about it."""
from __future__ import annotations

import shutil

import pytest

from conftest import call_tool, tiny_overrides

pytestmark = pytest.mark.slow  # finished tiny runs (trained_run)


def _files(run_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "checkpoints").iterdir()) if p.is_file()}


def test_a_checkpoint_copied_in_from_another_run_is_refused(trained_run, digits_root):
    """Another run's newer checkpoint, copied with its digest into this run's checkpoints/, used to
    be resumed silently (another lr, another length); now one line names it and nothing changes."""
    other = trained_run("other", **{"optim.lr": 0.1})
    run_dir = trained_run("run", **{"optim.iters": 4})
    for name in ("ckpt_000000008.pt", "ckpt_000000008.pt.sha256"):
        shutil.copy2(other / "checkpoints" / name, run_dir / "checkpoints" / name)
    before = _files(run_dir)
    overrides = tiny_overrides(digits_root, run_dir, **{"optim.iters": 4})
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", *overrides)
    assert res.returncode != 0
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "ckpt_000000008.pt was written by another run" in line, res.stderr
    assert "optim.lr (0.1 -> 0.05)" in line
    assert _files(run_dir) == before
    check = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", "--check", *overrides)
    assert check.returncode == 1 and "was written by another run" in check.stdout
