"""A corrupt unlabeled image met mid-run stops the run naming it and the command that goes on
without it; `--drop-images FILE` continues the run, deterministically (two continuations agree
bit for bit), and the event is in metrics.jsonl and tools/status.py; with data.max_bad_images
the run does the same by itself and ends where the command ends."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import assert_same_weights, call_tool, final_state, tiny_overrides
from simmatch.data.sharding import UNLABELED, ShardPlan


def _train(root, run_dir, *extra: str):
    overrides = tiny_overrides(root, run_dir, **{"train.ckpt_every": 1, "data.val_batch": 512})
    return call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", *overrides, *extra)


@pytest.fixture(scope="module")
def planted(digits_root, tmp_path_factory) -> tuple[Path, str, list[str]]:
    """(data tree, the corrupt image, the unlabeled list): the image the 6th step of epoch 0 reads
    (tiny runs: 8 + 16 images per step, one rank) truncated to a third."""
    from simmatch.config import load_config
    from simmatch.data.splits import load_splits

    root = tmp_path_factory.mktemp("planted") / "data"
    shutil.copytree(digits_root, root)
    unlabeled = load_splits(load_config("yaml/digits.yaml", [f"data.root={root}"]).data).unlabeled_files
    victim = unlabeled[int(ShardPlan(len(unlabeled), 16, 0, 1, 0, UNLABELED, True).rank_order(0)[5 * 16 + 3])]
    data = (root / "train" / victim).read_bytes()
    (root / "train" / victim).write_bytes(data[: len(data) // 3])
    return root, victim, unlabeled


@pytest.fixture(scope="module")
def continued(planted, tmp_path_factory) -> dict:
    """The run stopped by the image, then continued with --drop-images twice from copies of it."""
    root, victim, _ = planted
    tmp = tmp_path_factory.mktemp("dropped")
    run_dir = tmp / "run"
    stopped = _train(root, run_dir)
    reached = final_state(run_dir)["iteration"]
    listing = tmp / "bad.txt"
    listing.write_text(f"{victim}\n")
    twin = tmp / "twin"
    shutil.copytree(run_dir, twin, symlinks=True)
    results = {}
    for rd in (run_dir, twin):
        config = rd / "config.yaml"
        config.write_text(config.read_text().replace(f"run_dir: {run_dir}\n", f"run_dir: {rd}\n"))
        results[rd] = _train(root, rd, "--drop-images", str(listing))
    return {"stopped": stopped, "reached": reached, "run": run_dir, "twin": twin, "results": results}


@pytest.mark.slow  # tiny trainings
def test_a_corrupt_unlabeled_image_mid_run_is_dropped_and_the_run_goes_on(planted, continued):
    root, victim, unlabeled = planted
    stopped, run_dir = continued["stopped"], continued["run"]
    assert stopped.returncode != 0
    line = stopped.stderr.strip().splitlines()[-1]
    assert f"cannot decode image {root / 'train' / victim}" in line and f"write {victim} " in line, line
    assert "--drop-images FILE" in line
    assert 0 < continued["reached"] < 8, continued["reached"]  # stopped mid-run, after checkpoints
    for rd, res in continued["results"].items():
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"dropped 1 unlabeled image(s) from {rd}" in res.stdout
        assert (rd / "splits" / "dropped.txt").read_text() == f"{victim}\n"
        assert final_state(rd)["iteration"] == 8
    assert_same_weights(final_state(run_dir), final_state(continued["twin"]))
    # nothing of the run's split is rewritten: the dropped image stays listed where it was
    assert (run_dir / "splits" / "unlabeled.txt").read_text().split() == unlabeled
    events = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e for e in events if e["kind"] == "dropped"][0]["files"] == [victim]
    assert "1 unlabeled image(s) dropped" in (run_dir / "log_rank0.txt").read_text()
    status = call_tool("tools/status.py", str(run_dir))
    assert f"dropped:    1 unlabeled image(s), {victim}" in status.stdout


@pytest.mark.slow  # tiny trainings
def test_within_max_bad_images_the_run_drops_the_image_and_goes_on(planted, continued, tmp_path):
    """data.max_bad_images=1: the run meets the corrupt image, drops it, goes on from its last
    checkpoint and ends where `--drop-images` ends; the event is in metrics.jsonl."""
    root, victim, _ = planted
    budget = tmp_path / "budget"
    res = _train(root, budget, "data.max_bad_images=1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"note: {victim} does not decode; dropped (1 of data.max_bad_images=1)" in res.stderr
    events = [json.loads(ln) for ln in (budget / "metrics.jsonl").read_text().splitlines()]
    dropped = [e for e in events if e["kind"] == "dropped"]
    assert len(dropped) == 1 and dropped[0]["files"] == [victim] and "max_bad_images" in dropped[0]["reason"]
    assert_same_weights(final_state(budget), final_state(continued["run"]))


@pytest.mark.slow  # a finished tiny run
def test_drop_images_refuses_labeled_and_unknown_paths_in_one_line(trained_run, digits_root, tmp_path):
    run_dir = trained_run("run")
    labeled = (run_dir / "splits" / "labeled.txt").read_text().split()[0]
    for entry, says in ((labeled, "is a labeled image of this run"), ("9/nope.jpg", "is not in this run's unlabeled")):
        listing = tmp_path / "list.txt"
        listing.write_text(entry + "\n")
        res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", *tiny_overrides(digits_root, run_dir),
                        "--drop-images", str(listing), "--check")
        assert res.returncode == 2 and says in res.stderr.strip().splitlines()[-1], res.stderr
        assert not (run_dir / "splits" / "dropped.txt").exists()


def test_next_kept_image_takes_each_dropped_place():
    from simmatch.data.splits import substitute_dropped

    files, labels = ["a", "b", "c", "d", "e"], [0, 1, 2, 3, 4]
    assert substitute_dropped(files, labels, frozenset({"b", "c", "e"})) == (
        ["a", "d", "d", "d", "a"], [0, 3, 3, 3, 0])
