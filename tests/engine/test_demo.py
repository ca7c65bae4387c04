"""The README's demo is deterministic on one machine: the same command run twice writes the same
checkpoint, bit for bit. (Its printed accuracy differs between machines, whose CPU instruction
sets round the convolutions' sums differently: the README gives the three-seed mean and std.)"""
from __future__ import annotations

import pytest
import torch

from conftest import assert_same_weights, final_state, run_tool


@pytest.mark.slow  # two runs of the demo's command, each in its own process
def test_the_demo_run_twice_gives_the_same_checkpoint(tmp_path):
    from simmatch.data.digits import write_digits

    data = tmp_path / "digits"
    write_digits(data, size=32)  # what `python tools/make_digits.py --out data/digits` writes
    states = []
    for name in ("first", "second"):
        run_dir = tmp_path / name
        res = run_tool("tools/train.py", "--cfg", "yaml/digits.yaml", f"data.root={data}", f"train.run_dir={run_dir}",
                       "optim.iters=8", timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "validation top-1: student" in res.stdout
        states.append(final_state(run_dir))
    a, b = states
    assert a["iteration"] == 8
    assert_same_weights(a, b)  # student, teacher, bank, DA queue, momenta
    for ra, rb in zip(a["ranks"], b["ranks"]):  # and where each stream is, and every random state
        for stream in ("labeled", "unlabeled"):
            assert {k: v for k, v in ra[stream].items() if k != "plan"} == \
                {k: v for k, v in rb[stream].items() if k != "plan"}
        assert torch.equal(ra["rng"]["torch"], rb["rng"]["torch"])
