"""A diverged training stops with one line and a non-zero exit, and never saves NaN weights (the
run that diverges is resumed in this process from a shared finished run, conftest.trained_run)."""
import math

import pytest
import torch
from test_bad_input import assert_one_line_error

from conftest import call_tool, tiny_overrides
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
def test_diverged_run_keeps_last_good_checkpoint(trained_run, digits_root):
    run_dir = trained_run("r", **{"optim.iters": 2})
    # Resumed with an absurd learning rate (the saved config says so too, so that the run
    # directory accepts it): the weights blow up within a step or two.
    saved = run_dir / "config.yaml"
    saved.write_text(saved.read_text().replace("lr: 0.05", "lr: 1000000"))
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", "--allow-config-change",
                    *tiny_overrides(digits_root, run_dir, **{"optim.iters": 12, "optim.lr": 1000000,
                                                            "train.ckpt_every": 1}))
    assert_one_line_error(res, "training diverged", "not finite", str(run_dir / "checkpoints"))
    assert "validation top-1" not in res.stdout
    saved = [path for _, path in RunDir(run_dir).list_checkpoints()]
    assert saved and saved[0].name == "ckpt_000000002.pt"
    for path in saved:
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert state["iteration"] < 12
        for key, t in state["method"].items():
            if t.is_floating_point():
                assert torch.isfinite(t).all(), (path.name, key)
