"""A run directory belongs to one experiment: a changed config is refused with one line, a
longer schedule needs --allow-config-change, a finished run is reported, never re-trained.

The finished run is a copy of a shared one (conftest.trained_run); the commands after it run in
this process (conftest.call_tool)."""
import yaml
from conftest import assert_one_line_error, call_tool, final_state, tiny_overrides

RUN = {"optim.iters": 3, "data.val_batch": 512}


def train(root, run_dir, *extra: str, **over):
    values = {**RUN, **over}
    return call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", *extra, *tiny_overrides(root, run_dir, **values))


def test_changed_config_refused_finished_run_reported(trained_run, digits_root):
    run_dir = trained_run(**RUN)  # `train(digits_root, run_dir)` run to its end
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    config = (run_dir / "config.yaml").read_bytes()

    # The same command again: finished, nothing trained, nothing appended.
    res = train(digits_root, run_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "already finished (iteration 3)" in res.stdout and "teacher" in res.stdout
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics

    # A training change: refused with one line naming the keys and the way out.
    res = train(digits_root, run_dir, **{"train.seed": 1, "optim.lr": 0.1})
    assert_one_line_error(res, "train.seed", "optim.lr", "train.run_dir")
    res = train(digits_root, run_dir, **{"method.name": "supervised"})
    assert_one_line_error(res, "method.name", "train.run_dir")
    assert "checkpoint" not in res.stderr
    # A longer schedule: refused without the flag, which the line names.
    res = train(digits_root, run_dir, **{"optim.iters": 5})
    assert_one_line_error(res, "optim.iters", "--allow-config-change")
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics
    assert (run_dir / "config.yaml").read_bytes() == config

    # With the flag (and a neutral change of the log interval) the run goes on to the new end.
    res = train(digits_root, run_dir, "--allow-config-change", **{"optim.iters": 5, "train.log_every": 2})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "optim.iters" in res.stderr and "train.log_every" in res.stderr  # the note
    assert final_state(run_dir)["iteration"] == 5
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["optim"]["iters"] == 5 and saved["train"]["log_every"] == 2
    assert (run_dir / "metrics.jsonl").read_bytes().startswith(metrics)
