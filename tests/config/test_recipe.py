"""The published ImageNet recipes at 8 and 32 GPUs, derived without the data set, through the
command lines that print them (tools/train.py --print-config, tools/submit.py --dry-run; run in
this process by conftest.call_tool, and as commands by the slow variants); the per-step
conversions, BN-group rules and epoch rounding of `derive`; the shipped lists."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter

import pytest

from conftest import ROOT, call_tool, run_tool
from simmatch.config import derive, derive_scale, load_config, steps_per_epoch
from simmatch.data.sharding import ShardPlan
from simmatch.errors import ConfigError

IN1K_TRAIN = 1_281_167  # ImageNet-1k training images
# The authors' numbers (script/train.sh, 8 GPUs; epoch = floor(unlabeled / 320) with drop_last)
AUTHORS = {"in1k_1pct": dict(num_labeled=13_000, steps=3_963, total=1_585_200),
           "in1k_10pct": dict(num_labeled=128_000, steps=3_603, total=1_441_200)}


TOOLS = [pytest.param(call_tool, id="in_process"), pytest.param(run_tool, marks=pytest.mark.slow, id="command_line")]


def print_config(cfg: str, world: int, *overrides: str, tool=call_tool) -> dict:
    """Run tools/train.py --print-config; its last stdout line is the recipe's JSON."""
    proc = tool("tools/train.py", "--cfg", f"yaml/{cfg}.yaml", "--print-config",
                    "--world-size", str(world), *overrides, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(AUTHORS))
def test_in1k_at_8_gpus_is_the_authors_recipe(name):
    r = print_config(name, 8)
    a = AUTHORS[name]
    assert (r["world_size"], r["labeled_per_gpu"], r["unlabeled_per_gpu"]) == (8, 8, 40)
    assert (r["global_labeled"], r["global_unlabeled"]) == (64, 320)
    assert r["lr"] == pytest.approx(0.03, rel=1e-12)
    assert r["ema_momentum"] == pytest.approx(0.999, rel=1e-12) and r["da_len"] == 256
    assert (r["num_labeled"], r["num_unlabeled"]) == (a["num_labeled"], IN1K_TRAIN - a["num_labeled"])
    assert (r["steps_per_epoch"], r["total_iters"]) == (a["steps"], a["total"])
    assert r["warmup_iters"] == 5 * a["steps"] and r["l_in_start_iter"] == a["steps"]
    assert r["bn_group_ranks"] == 1 and r["bn_group_images"] == 48
    assert r["teacher"] == "ema_shuffle_bn"  # the published runs (no --eman)


@pytest.mark.parametrize("name", sorted(AUTHORS))
def test_in1k_at_32_gpus_scales_by_the_rule(name):
    r = print_config(name, 32)
    n_u = IN1K_TRAIN - AUTHORS[name]["num_labeled"]
    assert (r["labeled_per_gpu"], r["unlabeled_per_gpu"], r["global_labeled"]) == (8, 40, 256)
    assert r["lr"] == pytest.approx(0.03 * 256 / 64, rel=1e-12)  # 0.12
    assert r["ema_momentum"] == pytest.approx(0.999 ** 4, rel=1e-12)
    assert r["da_len"] == 64  # 256 batch means of 320 = 64 of 1280: the same images
    assert r["steps_per_epoch"] == n_u // 1280 and r["total_iters"] == 400 * (n_u // 1280)
    assert r["warmup_iters"] == 5 * (n_u // 1280) and r["l_in_start_iter"] == n_u // 1280
    assert (r["log_every"], r["ckpt_every"], r["eval_every"]) == (12, 250, 2500)  # 50/4, 1000/4, 10000/4
    assert r["bn_group_images"] >= 48


@pytest.mark.parametrize("name", sorted(AUTHORS))
def test_in1k_fixed_global_alternative_at_32_gpus(name):
    r = print_config(name, 32, "train.scale=fixed_global")
    a = AUTHORS[name]
    assert (r["labeled_per_gpu"], r["unlabeled_per_gpu"], r["global_labeled"]) == (2, 10, 64)
    assert (r["bn_group_ranks"], r["bn_group_images"]) == (4, 48)  # 4 ranks x (2 + 10)
    assert r["lr"] == pytest.approx(0.03) and r["ema_momentum"] == pytest.approx(0.999)
    assert (r["steps_per_epoch"], r["total_iters"]) == (a["steps"], a["total"])


@pytest.mark.parametrize("tool", TOOLS)
def test_small_bn_groups_are_refused_in_one_line(tool):
    proc = tool("tools/train.py", "--cfg", "yaml/in1k_1pct.yaml", "--print-config", "--world-size", "32",
                    "train.scale=fixed_global", "train.bn_group_ranks=2", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: BN groups would see 24 images (2 rank(s) x 12) at world size 32, fewer than "
        "train.min_bn_images=48: use train.scale=per_gpu, a larger train.bn_group_ranks (or 0: "
        "automatic), or lower train.min_bn_images to accept it"]
    # the explicit opt-out
    r = print_config("in1k_1pct", 32, "train.scale=fixed_global", "train.bn_group_ranks=1",
                     "train.min_bn_images=0", tool=tool)
    assert r["bn_group_images"] == 12


@pytest.mark.parametrize("tool", TOOLS)
def test_submit_dry_run_prints_the_recipe(tmp_path, tool):
    proc = tool("tools/submit.py", "--nodes", "4", "--cfg", "yaml/in1k_1pct.yaml", "--dry-run",
                    "--output-root", str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "#!/bin/bash" and "#SBATCH --nodes=4" in lines
    r = json.loads(lines[-1])
    assert (r["world_size"], r["labeled_per_gpu"], r["unlabeled_per_gpu"], r["lr"]) == (32, 8, 40, 0.12)
    assert (r["steps_per_epoch"], r["total_iters"], r["num_labeled"]) == (990, 396_000, 13_000)
    assert any(ln.startswith("recipe of in1k_1pct") for ln in lines)
    assert not (tmp_path / "in1k_1pct").exists()


def test_per_step_conversions_and_rounding():
    cfg = load_config("yaml/in1k_1pct.yaml", ["optim.iters=1000"])
    for world, da_len in ((1, 2048), (8, 256), (12, 171), (16, 128), (256, 8), (4096, 1)):
        s = derive_scale(cfg, world)
        k = 8 * world / 64
        assert s.step_scale == k and s.ema_momentum == pytest.approx(0.999 ** k, rel=1e-12)
        assert s.method_values["da_len"] == da_len == max(1, round(256 / k))  # nearest, at least one
        assert derive(cfg, world, 13_000, 1_268_167).total_iters == max(1, round(1000 / k))
    # fixed_global keeps today's meaning: only the lr follows the batch
    cfg = load_config(None, ["train.batch_size=128", "optim.base_batch=64", "train.ckpt_every=10"])
    s = derive_scale(cfg, 4)
    assert (s.lr, s.ema_momentum, s.method_values["da_len"], s.ckpt_every) == (0.06, 0.999, 256, 10)
    with pytest.raises(ConfigError, match="train.scale=per_gpu needs train.batch_per_gpu > 0"):
        load_config(None, ["train.scale=per_gpu"])
    with pytest.raises(ConfigError, match="train.bn_group_ranks=3 does not divide the world size 8"):
        derive_scale(load_config(None, ["train.bn_group_ranks=3"]), 8)


def test_epoch_rounding_and_drop_last_plan():
    assert steps_per_epoch(1_268_167, 320, "drop") == 3_963 and steps_per_epoch(1_268_167, 320, "pad") == 3_964
    assert steps_per_epoch(10, 64, "drop") == 1  # fewer items than a batch: one (padded) step
    plan = ShardPlan(103, 5, 1, 2, seed=0, tag=2, drop_last=True)
    assert plan.batches_per_epoch == 10  # floor(103 / 10)
    order = plan.global_order(0)
    assert len(order) == 100 and len(set(order.tolist())) == 100  # nothing repeated, 3 left out
    assert plan.fingerprint()["drop_last"] is True
    assert "drop_last" not in ShardPlan(103, 5, 1, 2, 0, 2).fingerprint()  # old checkpoints still match


@pytest.mark.slow  # a fresh interpreter in another working directory
def test_shipped_lists_exact_per_class_and_found_from_any_cwd(tmp_path):
    code = ("from simmatch.data.splits import read_list\n"
            "import json\n"
            "print(json.dumps({n: read_list(f'shipped:imagenet/simmatch_split_{n}_index.txt')\n"
            "                  for n in ('1p', '10p')}))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lists = json.loads(proc.stdout)
    for name, per_class in (("1p", 13), ("10p", 128)):
        entries = lists[name]
        counts = Counter(e.split("_")[0] for e in entries)
        assert len(entries) == len(set(entries)) == 1000 * per_class
        assert len(counts) == 1000 and set(counts.values()) == {per_class}
    assert (ROOT / "simmatch" / "splits" / "README.md").is_file()


def test_shipped_list_and_complement_on_an_imagenet_shaped_tree(tmp_path):
    """A tree with the 1% list's files plus two more per class: the labels follow the wnid
    folders, the complement is exactly the extra files, and --print-config counts the tree."""
    from simmatch.data.splits import load_splits, read_list

    entries = read_list("shipped:imagenet/simmatch_split_1p_index.txt")
    train, empty = tmp_path / "train", tmp_path / "empty"
    empty.touch()  # 15,000 names of one empty file: links are made ten times faster than files
    for wnid in sorted({e.split("_")[0] for e in entries}):
        (train / wnid).mkdir(parents=True)
        for extra in ("x1", "x2"):
            os.link(empty, train / wnid / f"{wnid}_{extra}.JPEG")
    for e in entries:
        os.link(empty, train / e.split("_")[0] / e)
    cfg = load_config("yaml/in1k_1pct.yaml", [f"data.root={tmp_path}"])
    s = load_splits(cfg.data, need_val=False)
    assert [f.rsplit("/", 1)[1] for f in s.labeled_files] == entries  # list order = bank order
    assert all(s.classes[y] == f.split("/")[0] for f, y in zip(s.labeled_files, s.labeled_labels))
    assert len(s.unlabeled_files) == 2000 and not set(s.unlabeled_files) & set(s.labeled_files)
    r = print_config("in1k_1pct", 8, f"data.root={tmp_path}")
    assert (r["num_labeled"], r["num_unlabeled"]) == (13_000, 2_000) and "data tree" in r["sizes_from"]
    assert r["steps_per_epoch"] == math.floor(2000 / 320)
    every = load_splits(load_config("yaml/in1k_1pct.yaml", [f"data.root={tmp_path}", "data.unlabeled=all"]).data,
                        need_val=False)
    assert len(every.unlabeled_files) == 15_000


@pytest.mark.slow
def test_two_ranks_train_per_gpu_with_pooled_bn(two_rank_run):
    """2 gloo ranks, 4 labeled per rank, reference batch 4 (k = 2): the trainer runs the
    derived recipe (half the steps, twice the lr) with BN pooled over both ranks, for the
    student and the train-mode shuffle-BN teacher (conftest's two_rank_run)."""
    import pandas as pd

    from conftest import final_state

    run_dir, res = two_rank_run
    assert res.returncode == 0, res.stderr[-3000:]
    rows = pd.read_json(run_dir / "metrics.jsonl", lines=True)
    train_rows = rows[rows["kind"] == "train"]
    assert list(train_rows["iteration"]) == [1, 2, 3, 4]  # optim.iters=8 at the reference batch
    assert train_rows["lr"].iloc[0] == pytest.approx(0.05 * 8 / 4)
    assert "BN statistics pooled over groups of 2 ranks (24 images per BN batch)" in \
        (run_dir / "log_rank0.txt").read_text()
    assert final_state(run_dir)["iteration"] == 4
