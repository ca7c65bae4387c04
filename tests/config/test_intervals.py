"""Intervals fit the run: `train.*_every` count steps of the reference batch, so at one process of the
ImageNet recipe they are 8 times as many iterations. The attack's run (the docs' example on a
240-image photo set at one process) printed `checkpoint every 1600 iterations, eval every 3200` for a
600-iteration run: no checkpoint and no evaluation before the end, and nothing said so."""
from __future__ import annotations

import re

from conftest import ROOT
from simmatch.config import derive, load_config
from simmatch.launch.recipe import recipe, recipe_lines


def docs_example(tmp_path, *overrides: str):
    """The config of docs/DATA.md section 3, as written there (its base found from yaml/)."""
    text = (ROOT / "docs" / "DATA.md").read_text()
    block = re.search(r"```yaml\n# yaml/flowers.yaml\n(.*?)```", text, re.S).group(1)
    path = tmp_path / "flowers.yaml"
    path.write_text(block.replace("base: in1k_1pct.yaml", f"base: {ROOT / 'yaml' / 'in1k_1pct.yaml'}"))
    return load_config(path, ["data.root=/nonexistent", "data.num_train_images=240", "data.num_classes=6", *overrides])


def test_the_docs_example_has_intervals_that_fit_a_small_run_at_one_process(tmp_path):
    r = recipe(docs_example(tmp_path), 1)
    assert r["total_iters"] == 600  # 100 epochs of floor(240 / 40) steps (train.partial_batch=drop)
    assert (r["log_every"], r["ckpt_every"], r["eval_every"]) == (16, 200, 200)
    assert r["intervals_clamped"] == []


def test_intervals_longer_than_the_run_are_clamped_with_a_line_saying_which(tmp_path):
    cfg = docs_example(tmp_path, "train.log_every=10", "train.ckpt_every=200", "train.eval_every=400")
    d = derive(cfg, 1, 24, 240)
    assert (d.total_iters, d.log_every, d.ckpt_every, d.eval_every) == (600, 80, 600, 600)
    assert list(d.interval_notes) == [
        "train.ckpt_every=1,600 iterations (200 reference steps) is longer than this run's 600: clamped to 600 "
        "(a checkpoint at the end only)",
        "train.eval_every=3,200 iterations (400 reference steps) is longer than this run's 600: clamped to 600 "
        "(evaluated at the end only)"]
    lines = recipe_lines(cfg, 1)
    at = lines.index("  intervals    log every 80, checkpoint every 600 iterations, eval every 600 (of 600)")
    assert lines[at + 1:at + 3] == [f"               {note}" for note in d.interval_notes]
    eight = derive(docs_example(tmp_path), 8, 24, 240)  # the docs' keys on 8 GPUs: 100 iterations
    assert (eight.total_iters, eight.ckpt_every, eight.interval_notes) == (100, 25, ())


def test_check_shows_the_effective_intervals(tmp_path):
    from simmatch.launch.preflight import run_checks

    cfg = load_config(ROOT / "yaml" / "digits.yaml", ["data.backend=synthetic", "data.synthetic_size=160",
                                                      "optim.iters=50"])
    (line,) = [c for c in run_checks(cfg, tmp_path / "run", 1) if c.name == "intervals"]
    assert line.ok and line.reason == (
        "log every 25, checkpoint every 50 iterations, eval at the end (of 50) at 1 process; "
        "train.ckpt_every=100 iterations is longer than this run's 50: clamped to 50 (a checkpoint at the end only)")
