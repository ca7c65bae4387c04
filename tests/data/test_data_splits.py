"""Splits, sharding plans, make_split, check_data and make_digits: no pipelines involved."""
from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

from conftest_data import data_cfg, load_tool
from simmatch.data.digits import write_digits
from simmatch.data.sharding import ShardPlan, val_slice
from simmatch.data.splits import load_splits, make_labeled_list, read_list
from simmatch.errors import ConfigError, DataError
from simmatch.images.tree import scan_tree

check_data = load_tool("check_data")
make_split = load_tool("make_split")


def test_scan_tree_and_errors(digits_root, tmp_path):
    tree = scan_tree(digits_root / "train", 10)
    assert tree.classes == [str(c) for c in range(10)]
    assert len(tree) == 1402 and tree.files == sorted(tree.files)
    assert all(f.split("/")[0] == tree.classes[y] for f, y in zip(tree.files, tree.labels))
    with pytest.raises(DataError, match=str(tmp_path / "missing")):
        scan_tree(tmp_path / "missing")
    with pytest.raises(DataError, match=r"train has 10 class folders but data.num_classes=7"):
        scan_tree(digits_root / "train", 7)
    with pytest.raises(DataError, match="nope.txt"):
        load_splits(data_cfg(digits_root, f"data.labeled_list={tmp_path / 'nope.txt'}").data)


def test_make_split_per_class_deterministic(digits_root, tmp_path):
    out = tmp_path / "l.txt"
    assert make_split.main(["--data", str(digits_root), "--per-class", "5", "--seed", "1",
                            "--out", str(out)]) == 0
    paths = read_list(out)
    assert Counter(p.split("/")[0] for p in paths) == {str(c): 5 for c in range(10)}
    again = make_labeled_list(digits_root / "train", per_class=5, seed=1)
    assert again == paths
    assert make_labeled_list(digits_root / "train", per_class=5, seed=2) != paths
    pct = make_labeled_list(digits_root / "train", percent=10, seed=0)
    tree = scan_tree(digits_root / "train")
    sizes = Counter(tree.classes[y] for y in tree.labels)
    assert Counter(p.split("/")[0] for p in pct) == {c: int(n * 0.1 + 0.5) for c, n in sizes.items()}


def test_convert_bare_names_and_missing_entries(digits_root, tmp_path):
    paths = make_labeled_list(digits_root / "train", per_class=2, seed=0)
    bare = tmp_path / "bare.txt"
    bare.write_text("".join(p.split("/")[1] + "\n" for p in reversed(paths)))
    assert make_labeled_list(digits_root / "train", from_list=bare) == list(reversed(paths))
    bad = tmp_path / "bad.txt"
    bad.write_text("0/does_not_exist.jpg\n")
    with pytest.raises(DataError, match="bad.txt.*does_not_exist"):
        make_labeled_list(digits_root / "train", from_list=bad)
    with pytest.raises(ConfigError):
        load_splits(data_cfg(digits_root, "data.labeled_per_class=0").data)


def test_labeled_list_keeps_bank_order(digits_root, tmp_path):
    lst = tmp_path / "labeled.txt"
    lst.write_text("3/0003.jpg\n0/0000.jpg\n")
    splits = load_splits(data_cfg(digits_root, f"data.labeled_list={lst}").data)
    assert splits.labeled_files == ["3/0003.jpg", "0/0000.jpg"]
    assert splits.labeled_labels == [3, 0]


@pytest.mark.parametrize("n,b,w", [(40, 4, 2), (1402, 16, 2), (13, 8, 1), (5, 4, 3)])
def test_shard_plan_disjoint_covering_full(n, b, w):
    plans = [ShardPlan(n, b, r, w, seed=3, tag=1) for r in range(w)]
    for epoch in (0, 1):
        orders = [p.rank_order(epoch) for p in plans]
        assert all(len(o) == plans[0].batches_per_epoch * b for o in orders)
        steps = np.stack([o.reshape(-1, b) for o in orders], 1)  # [steps, ranks, b]
        flat = steps.reshape(-1)
        assert set(flat.tolist()) == set(range(n))  # covering
        if n >= b * w:  # within a step, ranks never share an item
            assert all(len(set(s.reshape(-1).tolist())) == b * w for s in steps)
        if n % (b * w) == 0:
            assert sorted(flat.tolist()) == list(range(n))  # exactly once: disjoint
    p = plans[0]
    assert not np.array_equal(p.global_order(0), p.global_order(1))
    assert np.array_equal(p.global_order(1), ShardPlan(n, b, 0, w, 3, 1).global_order(1))
    # the global batch sequence does not depend on the world size
    if (n % (b * w)) == 0:
        one = ShardPlan(n, b * w, 0, 1, 3, 1).global_order(0)
        assert np.array_equal(one, p.global_order(0))


def test_val_slice_exact():
    for n, w in [(395, 1), (395, 2), (395, 3), (2, 4)]:
        got = [i for r in range(w) for i in range(*val_slice(n, r, w))]
        assert got == list(range(n))


def test_check_data_flags_corrupt_file(corrupt_root, digits_root, capsys):
    assert check_data.main([str(corrupt_root)]) == 1
    out = capsys.readouterr().out
    assert "bad.jpg: cannot decode" in out and "train: 2 classes" in out
    assert check_data.main([str(digits_root / "val"), "--quiet"]) == 0


def test_make_digits_deterministic(tmp_path):
    def digest(root):
        h = hashlib.sha1()
        for p in sorted(root.rglob("*.jpg")):
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
        return h.hexdigest()

    counts = write_digits(tmp_path / "a", size=8)
    write_digits(tmp_path / "b", size=8)
    assert counts["train"] + counts["val"] == 1797 and 1350 <= counts["train"] <= 1450
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "a" / "train").iterdir()) == [str(c) for c in range(10)]
