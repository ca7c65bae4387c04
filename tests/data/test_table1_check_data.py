"""tools/check_data.py on the folders torchvision downloads CIFAR-10 and STL-10 into (written by
tests/conftest_archives.py): every split counted, a damaged file named in one line, exit status 1."""
from __future__ import annotations

from conftest_archives import write_cifar10, write_stl10

from conftest import call_tool


def test_table1_check_data_reads_every_split(tmp_path):
    root = write_stl10(tmp_path / "stl", per_class_train=3, per_class_test=1, n_unlabeled=7)
    res = call_tool("tools/check_data.py", str(root), "--quiet")
    assert res.returncode == 0, res.stderr
    assert f"{root} stl10 train: 30 images of 96 px, 10 classes (3-3 per class)" in res.stdout
    assert f"{root} stl10 unlabeled: 7 images of 96 px, 10 classes (no labels)" in res.stdout
    assert res.stdout.strip().splitlines()[-1].startswith("read 47 images of stl10") and "no problems" in res.stdout


def test_table1_check_data_names_a_truncated_batch(tmp_path):
    root = write_cifar10(tmp_path / "c10", per_class_train=2, per_class_test=1)
    batch = root / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(batch.read_bytes()[:300])
    res = call_tool("tools/check_data.py", str(root), "--quiet")
    assert res.returncode == 1
    problems = [ln for ln in res.stdout.splitlines() if ln.startswith("  CIFAR-10 test: ")]
    assert len(problems) == 1 and f"{batch} does not load as a pickle" in problems[0], res.stdout
    assert "cifar10 train: 20 images of 32 px" in res.stdout  # the other splits are still read
