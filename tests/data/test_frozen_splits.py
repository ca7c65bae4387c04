"""A resumed run trains on the split it started with: missing files stop it, new ones are ignored.

The run starts as a copy of a shared finished run of digits_root (conftest.trained_run), its data as
a copy of that tree; it is resumed in this process (conftest.call_tool)."""
import shutil

import pytest

from conftest import assert_one_line_error, call_tool, tiny_overrides

pytestmark = pytest.mark.timeout(1200)


def train(data, run_dir, iters):
    return call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", "--allow-config-change",
                     *tiny_overrides(data, run_dir, **{"optim.iters": iters, "data.labeled_per_class": 4}))


def test_resume_keeps_split(trained_run, digits_root, tmp_path):
    from simmatch.config import load_config
    from simmatch.data.splits import load_splits, sample_split
    from simmatch.errors import DataError
    from simmatch.images.tree import scan_tree

    data = tmp_path / "data"
    shutil.copytree(digits_root, data)
    run_dir = trained_run(**{"optim.iters": 2})  # trained on digits_root: the same tree as `data`
    labeled = (run_dir / "splits" / "labeled.txt").read_text().split()
    unlabeled = (run_dir / "splits" / "unlabeled.txt").read_text().split()
    assert len(labeled) == 40 and len(unlabeled) == len(scan_tree(data / "train"))

    # Three unlabeled images of a labeled image's class disappear between runs.
    cls = labeled[0].split("/")[0]
    gone = [f for f in unlabeled if f.startswith(cls + "/") and f not in labeled][:3]
    for f in gone:
        shutil.move(data / "train" / f, tmp_path / f.replace("/", "_"))
    # What a re-drawn split would be: it differs from the run's (the fault being guarded against).
    redrawn = sample_split(scan_tree(data / "train"), per_class=4, seed=0)
    assert redrawn != sorted(labeled)
    res = train(data, run_dir, 4)
    assert_one_line_error(res, "3 unlabeled files", gone[0], "splits/unlabeled.txt")
    assert (run_dir / "splits" / "labeled.txt").read_text().split() == labeled
    for f in gone:
        shutil.move(tmp_path / f.replace("/", "_"), data / "train" / f)

    # A labeled image disappears: the same line, naming it.
    shutil.move(data / "train" / labeled[5], tmp_path / "lab.jpg")
    cfg = load_config("yaml/digits.yaml", tiny_overrides(data, run_dir))
    with pytest.raises(DataError, match=f"1 labeled files .* are missing: .*{labeled[5]}"):
        load_splits(cfg.data, frozen=run_dir / "splits")
    shutil.move(tmp_path / "lab.jpg", data / "train" / labeled[5])

    # A new image appears: a warning, and the run resumes on its own lists.
    shutil.copy(data / "train" / labeled[0], data / "train" / cls / "new_image.jpg")
    res = train(data, run_dir, 4)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout + res.stderr
    assert "1 images under" in out and "ignored" in out
    assert f"40 labeled / {len(unlabeled):,} unlabeled images" in out
    assert "resumed from" in out
    assert (run_dir / "splits" / "labeled.txt").read_text().split() == labeled
    assert (run_dir / "splits" / "unlabeled.txt").read_text().split() == unlabeled
