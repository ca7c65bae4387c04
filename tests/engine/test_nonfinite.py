"""A diverged training stops with one line and a non-zero exit, and never saves NaN weights (the
run that diverges trains in this process: a learning rate warmed up to an absurd value)."""
import math
import re

import pytest
import torch

from conftest import assert_one_line_error, call_tool, tiny_overrides
from simmatch.run.rundir import RunDir


def test_guard_counts_consecutive_steps():
    from simmatch.engine.guard import DivergedError, NonFiniteGuard

    nan = float("nan")
    guard = NonFiniteGuard(3, torch.device("cpu"))
    for v in (1.0, nan, nan, nan, 2.0, nan):  # three in a row is still allowed
        guard.update(torch.tensor(v))
    guard.check(6, "ckpts")
    for v in (nan, nan, 1.0):  # the streak from step 6 goes on: 3, then reset
        guard.update(torch.tensor(v))
    guard.check(9, "ckpts")
    for v in (math.inf, nan, nan, -math.inf, 1.0):  # four in a row inside one window
        guard.update(torch.tensor(v))
    with pytest.raises(DivergedError, match="not finite for 4 consecutive steps .* iteration 14"):
        guard.check(14, "ckpts")
    model = torch.nn.Linear(2, 2)
    guard.check(15, "ckpts", model)  # finite weights, streak reset
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(DivergedError, match="weights are not finite at iteration 16"):
        guard.check(16, "ckpts", model)


@pytest.mark.timeout(1200)
def test_diverged_run_keeps_last_good_checkpoint(digits_root, tmp_path):
    run_dir = tmp_path / "r"
    # An absurd learning rate reached by warm-up (lr 1000 over the first 8 steps): a few good
    # steps and checkpoints, then the weights blow up.
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml",
                    *tiny_overrides(digits_root, run_dir, **{"optim.iters": 12, "optim.lr": 1000,
                                                            "optim.warmup_epochs": 0.1, "train.ckpt_every": 1}))
    assert_one_line_error(res, "training diverged", "not finite", str(run_dir / "checkpoints"))
    assert "validation top-1" not in res.stdout
    diverged = int(re.search(r"not finite at iteration (\d+)", res.stderr).group(1))
    saved = [path for _, path in RunDir(run_dir).list_checkpoints()]
    assert saved and 1 < diverged < 12
    for path in saved:
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert state["iteration"] < diverged
        for key, t in state["method"].items():
            if t.is_floating_point():
                assert torch.isfinite(t).all(), (path.name, key)
