"""The Table 1 recipes (yaml/cifar10_*.yaml, cifar100_*, svhn_*, stl10_*) as --print-config shows
them where the data is absent: the papers' and USB's values, with where each comes from."""
from __future__ import annotations

import json

import pytest

from conftest import ROOT, assert_one_line_error, call_tool

ROWS = {  # config: (labels, classes, arch, weight decay, flip, px, unlabeled pool)
    "cifar10_40": (40, 10, "wrn_28_2", 5e-4, True, 32, 50_000),
    "cifar10_250": (250, 10, "wrn_28_2", 5e-4, True, 32, 50_000),
    "cifar10_4000": (4000, 10, "wrn_28_2", 5e-4, True, 32, 50_000),
    "cifar100_400": (400, 100, "wrn_28_8", 1e-3, True, 32, 50_000),
    "cifar100_2500": (2500, 100, "wrn_28_8", 1e-3, True, 32, 50_000),
    "cifar100_10000": (10000, 100, "wrn_28_8", 1e-3, True, 32, 50_000),
    "svhn_40": (40, 10, "wrn_28_2", 5e-4, False, 32, 73_257),
    "svhn_250": (250, 10, "wrn_28_2", 5e-4, False, 32, 73_257),
    "svhn_1000": (1000, 10, "wrn_28_2", 5e-4, False, 32, 73_257),
    "stl10_40": (40, 10, "wrn_37_2", 5e-4, True, 96, 100_000),
    "stl10_250": (250, 10, "wrn_37_2", 5e-4, True, 96, 100_000),
    "stl10_1000": (1000, 10, "wrn_37_2", 5e-4, True, 96, 100_000),
}


def print_config(name: str, *extra: str) -> tuple[str, dict]:
    res = call_tool("tools/train.py", "--cfg", str(ROOT / "yaml" / f"{name}.yaml"), "data.root=/nonexistent",
                    *extra, "--print-config")
    assert res.returncode == 0, res.stderr
    return res.stdout, json.loads(res.stdout.strip().splitlines()[-1])


def test_table1_cifar10_40_recipe_as_the_issue_states_it():
    out, r = print_config("cifar10_40")
    assert "1,048,576 iterations" in out and "64 labeled + 448 unlabeled" in out
    assert "K = 40 rows, one per labeled image; a temporal ensemble: row <- normalize(0.7 row + 0.3 new)" in out
    assert "cos(7 pi k / 16 K)" in out and "L_in         starts at iteration 1,024" in out
    assert "the student's own weak view" in out and "EMA momentum 0.999" in out
    assert "32 px, translated by up to 4 px (reflect padding" in out and "FixMatch's RandAugment, 2 random ops" in out
    assert r["total_iters"] == 2 ** 20 and (r["global_labeled"], r["global_unlabeled"]) == (64, 448)
    assert r["bank_rows"] == 40 and r["method_params"]["bank_momentum"] == 0.7 and r["da_len"] == 32
    # each quantity with where it comes from
    assert r["sources"]["optim.lr"] == {"value": 0.03, "from": "FixMatch paper and USB (lr: 0.03)"}
    assert "method.simmatch.tau = 0.95: SimMatch paper (tau 0.95 on CIFAR) and USB (p_cutoff)" in out


@pytest.mark.parametrize("name", sorted(ROWS))
def test_table1_every_row_has_its_papers_values(name):
    labels, classes, arch, wd, flip, px, pool = ROWS[name]
    _, r = print_config(name)
    assert (r["num_labeled"], r["num_unlabeled"], r["crop_size"]) == (labels, pool, px)
    assert r["bank_rows"] == labels and r["total_iters"] == 2 ** 20
    src = r["sources"]
    assert src["model.arch"]["value"] == arch and src["optim.weight_decay"]["value"] == wd
    assert ("data.flip" in src) == (not flip)  # SVHN's digits are not flipped, with its source


def test_table1_fixmatch_rows_are_the_same_configs():
    out, r = print_config("cifar100_400", "method.name=fixmatch")
    assert r["method"] == "fixmatch" and r["method_params"] == {"tau": 0.95, "lambda_u": 1.0}
    assert r["sources"]["method.fixmatch.tau"]["value"] == 0.95 and "method.simmatch.tau" not in r["sources"]
    assert "1,048,576 iterations" in out and r["sources"]["model.arch"]["value"] == "wrn_28_8"


def test_table1_a_value_changed_on_the_command_line_says_so():
    out, r = print_config("cifar10_40", "optim.lr=0.05")
    assert r["sources"]["optim.lr"] == {"value": 0.05, "from": "command line"}
    assert "optim.lr = 0.05: command line" in out


@pytest.mark.parametrize("extra, needle", [
    (["data.crop_size=28"], "data.format=cifar10 holds 32 px images"),
    (["data.augment=crop", "data.strong=simclr"], "set data.augment=translate and data.crop_size=32"),
    (["data.strong=simclr"], "data.augment=translate with data.strong=simclr"),
    (["data.extra=true"], "data.extra=true is for data.format=svhn"),
    (["model.small_input=true"], "model.small_input=true is for ResNets: wrn_28_2"),
    (["model.teacher=ema_shuffle_bn"], "method.simmatch.targets=student makes its targets with the student"),
], ids=["crop_size", "augment", "strong", "extra", "small_input", "teacher"])
def test_table1_contradictions_are_one_line(extra, needle):
    res = call_tool("tools/train.py", "--cfg", str(ROOT / "yaml" / "cifar10_40.yaml"), "data.root=/nonexistent",
                    *extra, "--print-config")
    assert_one_line_error(res, needle)


def test_table1_a_truncated_archive_is_one_line_before_training(tmp_path):
    from conftest_archives import write_cifar10

    root = write_cifar10(tmp_path / "c10", per_class_train=2, per_class_test=1)
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    res = call_tool("tools/train.py", "--cfg", str(ROOT / "yaml" / "cifar10_40.yaml"), f"data.root={root}",
                    f"train.run_dir={tmp_path / 'run'}", "data.backend=torch", "data.labeled_per_class=1")
    assert_one_line_error(res, f"{batch} does not load as a pickle")
    assert not (tmp_path / "run").exists()  # a refused start leaves no run directory behind


def test_table1_student_targets_refuse_virtual_ranks(tmp_path):
    """SimMatch's own-forward targets take their DA means in the forward: two ranks in one process
    would each align on half the batch; refused in one line, and no run directory is left."""
    res = call_tool("tools/train.py", "--cfg", str(ROOT / "yaml" / "digits_table1.yaml"), "data.backend=synthetic",
                    "data.synthetic_size=64", "data.num_classes=10", "train.virtual_world_size=2",
                    "train.batch_size=16", "optim.iters=2", f"train.run_dir={tmp_path / 'run'}")
    assert_one_line_error(res, "simmatch makes its targets in the student's forward", "not 2")
    assert not (tmp_path / "run").exists()
