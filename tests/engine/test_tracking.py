"""Tracking: a wall-clock time in every metrics.jsonl record, TensorBoard scalars of every
record (read back with tensorboard's EventAccumulator), W&B asked for but not installed."""
import importlib.util
import json
import os
import time

import pytest

from conftest import assert_one_line_error, call_tool, run_tool, tiny_overrides


@pytest.mark.slow
def test_tensorboard_scalars_match_metrics_file(digits_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    start = time.time()
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml",  # trained in this process
                    *tiny_overrides(digits_root, run_dir, **{"optim.iters": 3, "train.eval_every": 2,
                                                             "train.tensorboard": "true", "data.val_batch": 512}))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "total time " in res.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(start <= r["time"] <= time.time() for r in records)
    assert [r["time"] for r in records] == sorted(r["time"] for r in records)

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    expected = {}
    for r in records:
        for k, v in r.items():
            if k not in ("kind", "iteration", "time") and isinstance(v, (int, float)):  # a record's numbers
                expected.setdefault(f"{r['kind']}/{k}", []).append((r["iteration"], v))
    assert {"finished/final", "finished/best", "finished/median_last20"} <= set(expected)
    assert {"train/loss", "train/lr", "train/img_s", "eval/teacher_top1"} <= set(expected)
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), tag


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_asked_for_but_not_installed(digits_root, tmp_path):
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml",
                   *tiny_overrides(digits_root, tmp_path / "r", **{"train.wandb": "true"}))
    assert_one_line_error(res, "train.wandb", "pip install wandb")
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_wandb_offline(digits_root, tmp_path):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="offline")
    res = run_tool("tools/train.py", "--cfg", "yaml/digits.yaml",
                   *tiny_overrides(digits_root, run_dir, **{"optim.iters": 2, "train.wandb": "true",
                                                            "data.val_batch": 512}), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
