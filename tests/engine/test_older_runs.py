"""A run made by an earlier version goes on under this one: its config.yaml and checkpoints name the
method's keys flat (`method.v2_k`), as the code before the methods owned their sections wrote them.
The earlier code is taken from this repository's history (`git archive`), trains a run to step 16
with a checkpoint at step 8, and a copy of that run cut back to step 8 finishes under this code,
bit-identical to the earlier code's own step 16, after one line naming the keys it mapped."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import ROOT, assert_same_weights, call_tool, final_state, tiny_overrides

EARLIER = "9dd8149"  # the last commit whose configs named the method's keys flat


def _earlier_tree(dest: Path) -> Path:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs this repository's git history (a checkout, not an export)")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", EARLIER], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"commit {EARLIER} is not in this checkout's history: {archive.stderr.decode()[:200]}")
    tar = dest.with_suffix(".tar")
    tar.write_bytes(archive.stdout)
    with tarfile.open(tar) as f:
        f.extractall(dest, filter="data")
    return dest


@pytest.mark.slow  # a training by the earlier code in its own interpreter, and one by this code
def test_a_run_of_the_earlier_version_finishes_bit_identical(digits_root, tmp_path):
    earlier = _earlier_tree(tmp_path / "earlier")
    old_run = tmp_path / "old_run"
    overrides = tiny_overrides(digits_root, old_run, **{"optim.iters": 16, "train.ckpt_every": 8,
                                                        "train.keep_ckpts": 5, "data.val_batch": 512})
    res = subprocess.run([sys.executable, "tools/train.py", "--cfg", "yaml/digits_v2.yaml", *overrides],
                         cwd=earlier, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(earlier)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "v2_topn: 16" in (old_run / "config.yaml").read_text()  # the earlier, flat keys
    # the same run cut back to its checkpoint of step 8
    run_dir = tmp_path / "run"
    shutil.copytree(old_run, run_dir, symlinks=True)
    ckpts = run_dir / "checkpoints"
    for name in os.listdir(ckpts):
        if not name.startswith("ckpt_000000008."):
            (ckpts / name).unlink()
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace(f"run_dir: {old_run}\n", f"run_dir: {run_dir}\n"))
    new = [o.replace(str(old_run), str(run_dir)) for o in overrides]
    res = call_tool("tools/train.py", "--cfg", "yaml/digits_v2.yaml", *new)
    assert res.returncode == 0, res.stderr[-3000:]
    note = [ln for ln in res.stderr.splitlines() if "as an earlier version did" in ln]
    assert len(note) == 1 and "method.v2_topn -> method.simmatchv2.topn" in note[0] and \
        "method.v2_k -> method.simmatchv2.k" in note[0], res.stderr[-2000:]
    assert f"resumed from {ckpts}/ckpt_000000008.pt at iteration 8" in (run_dir / "log_rank0.txt").read_text()
    earlier_end = torch.load(old_run / "checkpoints" / "ckpt_000000016.pt", map_location="cpu", weights_only=True)
    assert_same_weights(final_state(run_dir), earlier_end)
    text = config.read_text()
    assert "v2_topn" not in text and "  simmatchv2:\n" in text  # written again with today's keys
    # an earlier key on the command line is refused, naming today's
    refused = call_tool("tools/train.py", "--cfg", "yaml/digits_v2.yaml", *new, "method.v2_k=4", "--check")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        "error: command line: method.v2_k is a key of an earlier version: it is method.simmatchv2.k now (each "
        "method's keys are method.<name>.*; docs/RUNS.md lists them)")
