"""Every name a tree can hold survives the run's own lists, a bad image is named by the path it
carries (never parsed back out of a message), and a drop file may name images in every form the
tools print."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest_data import data_cfg
from simmatch.config import load_config
from simmatch.data.splits import load_splits, read_list, resolve_list
from simmatch.images.tree import scan_tree
from simmatch.run.dropped import as_listed
from simmatch.run.rundir import read_run_list, run_list_text

# names that used to pass the first start and break every resume: the lists split lines on every
# Unicode line break and on whitespace, stripped them, and rewrote "\" as "/"
ODD_NAMES = ["sp ace.jpg", "back\\slash.jpg", "u\u2028line.jpg", "form\x0cfeed.jpg", "tab\tname.jpg",
             " lead.jpg", "trail .jpg", "co: lon.jpg", "#hash.jpg", "next\x85line.jpg"]
ODD_CLASS = " 9"  # a class folder whose name begins with a space


@pytest.fixture(scope="module")
def odd_tree(digits_root, tmp_path_factory) -> Path:
    """The digits tree with one image of classes 0..len(ODD_NAMES)-1 renamed to each odd name and
    class 9 renamed " 9" (in train and val)."""
    root = tmp_path_factory.mktemp("odd") / "data"
    shutil.copytree(digits_root, root)
    for i, name in enumerate(ODD_NAMES):
        first = sorted((root / "train" / str(i % 9)).iterdir())[i // 9]
        first.rename(first.with_name(name))
    for split in ("train", "val"):
        (root / split / "9").rename(root / split / ODD_CLASS)
    return root


def test_a_run_list_round_trips_every_name(tmp_path):
    names = [f"cls/{n}" for n in ODD_NAMES] + [f"{ODD_CLASS}/x.jpg"]
    path = tmp_path / "unlabeled.txt"
    path.write_bytes(run_list_text(names).encode())
    assert read_run_list(path) == names


def test_a_frozen_split_of_odd_names_resumes(odd_tree, tmp_path):
    """The lists a run writes at its first start are read back, at its resume, as the same files."""
    cfg = data_cfg(odd_tree)
    first = load_splits(cfg.data)
    assert {f"{i % 9}/{n}" for i, n in enumerate(ODD_NAMES)} <= set(first.unlabeled_files)
    assert any(f.startswith(f"{ODD_CLASS}/") for f in first.unlabeled_files)
    frozen = tmp_path / "splits"
    frozen.mkdir()
    (frozen / "labeled.txt").write_bytes(run_list_text(first.labeled_files).encode())
    (frozen / "unlabeled.txt").write_bytes(run_list_text(first.unlabeled_files).encode())
    again = load_splits(cfg.data, frozen=frozen)  # raised "N unlabeled files ... are missing" before
    assert again.unlabeled_files == first.unlabeled_files and again.labeled_files == first.labeled_files
    assert again.unlabeled_labels == first.unlabeled_labels


def test_a_config_list_names_files_as_written_and_still_reads_path_label_lines(odd_tree, tmp_path):
    tree = scan_tree(odd_tree / "train")
    listing = tmp_path / "labeled.txt"
    listing.write_text("0/sp ace.jpg\n1/back\\slash.jpg\n# a comment\n./2/" + sorted(
        f for f in tree.files if f.startswith("2/") and f.isascii() and " " not in f)[0].split("/")[1] + " 2\n")
    files, labels = resolve_list(tree, read_list(listing), str(listing))
    index = tree.classes.index  # " 9" sorts first
    assert files[:2] == ["0/sp ace.jpg", "1/back\\slash.jpg"] and labels[:2] == [index("0"), index("1")]
    assert files[2].startswith("2/") and labels[2] == index("2")  # "./path label": the path field


@pytest.mark.slow  # builds DALI and DataLoader streams (3 s)
def test_an_image_error_carries_its_path_whatever_it_holds(tmp_path, digits_root):
    """`hubble/co: lon.JPEG` used to become `hubble/co` (the path was parsed back out of the error
    message at the first ': '), so data.max_bad_images did not drop it."""
    from conftest_data import streams_for

    root = tmp_path / "data"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for src in sorted((digits_root / split / cls.replace("a", "0").replace("b", "1")).iterdir())[:6]:
                shutil.copy(src, root / split / cls / src.name)
    good = sorted((root / "train" / "b").iterdir())[0].read_bytes()
    (root / "train" / "b" / "co: lon.jpg").write_bytes(good[: len(good) // 3])
    cfg = load_config(None, [f"data.root={root}", "data.num_classes=2", "data.labeled_per_class=1",
                             "data.device=cpu", "data.crop_size=16", "data.num_threads=1", "train.batch_size=2",
                             "train.mu=7", "data.check_images=false"])
    for backend in ("dali", "torch"):
        cfg.data.backend = backend
        streams = streams_for(cfg, 0, 1, "cpu")
        try:
            with pytest.raises(Exception) as caught:
                for _ in range(3):
                    next(streams.train[0].unlabeled)
        finally:
            streams.close()
        assert getattr(caught.value, "droppable", None) == "b/co: lon.jpg", (backend, caught.value)
        assert "write b/co: lon.jpg (as RUN_DIR/splits/unlabeled.txt" in str(caught.value)


def test_a_drop_file_may_name_an_image_in_every_form_the_tools_print(tmp_path):
    unlabeled = {"n01/a b.JPEG", "n01/c\\d.JPEG"}
    root = tmp_path / "data" / "train"
    assert as_listed("n01/a b.JPEG", unlabeled, root) == "n01/a b.JPEG"  # as the run's list names it
    assert as_listed(f"{root}/n01/a b.JPEG", unlabeled, root) == "n01/a b.JPEG"  # check_data's absolute path
    assert as_listed(f"{root}/./n01/c\\d.JPEG", unlabeled, root) == "n01/c\\d.JPEG"
    assert as_listed("n01/a b.JPEG (in shard /s/train/000001.tar at offset 5120)", unlabeled, root) == "n01/a b.JPEG"
    assert as_listed("/elsewhere/n01/a b.JPEG", unlabeled, root) is None


@pytest.mark.slow  # a tiny training and its resume
def test_a_run_on_odd_names_trains_and_resumes(odd_tree, tmp_path):
    """The attack's names (a space, a backslash, U+2028, a form feed, a class folder that begins with a
    space) passed check_data and the first start, and failed every resume ("N unlabeled files ... are
    missing"). Now check_data, the first start and the resume pass, and the odd names are trained on."""
    from conftest import call_tool, tiny_overrides

    assert call_tool("tools/check_data.py", str(odd_tree), "--quiet").returncode == 0
    run_dir = tmp_path / "run"
    labeled = [f"{i % 9}/{n}" for i, n in enumerate(ODD_NAMES)]
    labeled.append(f"{ODD_CLASS}/" + sorted(p.name for p in (odd_tree / "train" / ODD_CLASS).iterdir())[0])
    listing = tmp_path / "labeled.txt"
    listing.write_bytes(run_list_text(labeled).encode())  # the labeled stream reads them all in 2 steps
    overrides = tiny_overrides(odd_tree, run_dir, **{"optim.iters": 2, "data.val_batch": 512,
                                                     "data.labeled_list": listing})
    first = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", *overrides)
    assert first.returncode == 0, first.stderr[-3000:]
    listed = read_run_list(run_dir / "splits" / "unlabeled.txt")
    assert {f"{i % 9}/{n}" for i, n in enumerate(ODD_NAMES)} <= set(listed)
    resumed = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", *overrides, "optim.iters=4",
                        "--allow-config-change")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in (run_dir / "log_rank0.txt").read_text()
