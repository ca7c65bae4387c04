"""Bad input: one `error:` line naming the culprit, exit 2, no traceback, nothing overwritten."""
import hashlib
from pathlib import Path

import pytest

from conftest import run_tool, tiny_overrides


def snapshot(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def assert_one_line_error(res, *needles: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in errors[0], errors[0]


def test_unknown_key(digits_root, tmp_path):
    res = run_tool("tools/train.py", "--cfg", "yaml/digits.yaml", *tiny_overrides(digits_root, tmp_path / "r"),
                   "train.batchsize=4")
    assert_one_line_error(res, "train.batchsize")
    assert not (tmp_path / "r").exists()


def test_missing_config_file(tmp_path):
    res = run_tool("tools/train.py", "--cfg", str(tmp_path / "nope.yaml"))
    assert_one_line_error(res, "nope.yaml")


def test_missing_data_dir(tmp_path):
    res = run_tool("tools/train.py", "--cfg", "yaml/digits.yaml",
                   *tiny_overrides(tmp_path / "no_such_data", tmp_path / "r"))
    assert_one_line_error(res, "no_such_data")


def test_missing_split_file(digits_root, tmp_path):
    res = run_tool("tools/train.py", "--cfg", "yaml/digits.yaml", *tiny_overrides(digits_root, tmp_path / "r"),
                   f"data.labeled_list={tmp_path / 'labels.txt'}")
    assert_one_line_error(res, "labels.txt")


def test_batch_not_divisible_by_world_size(digits_root, tmp_path):
    res = run_tool("tools/train.py", "--cfg", "yaml/digits.yaml", "--nproc", "2",
                   *tiny_overrides(digits_root, tmp_path / "r", **{"train.batch_size": 7}))
    assert_one_line_error(res, "train.batch_size=7", "world size 2")


@pytest.mark.slow
def test_checkpoint_of_another_architecture(digits_root, tmp_path):
    run_dir = tmp_path / "r"
    res = run_tool("tools/train.py", "--cfg", "yaml/digits.yaml", *tiny_overrides(digits_root, run_dir, **{"optim.iters": 2}))
    assert res.returncode == 0, res.stderr[-2000:]
    before = snapshot(run_dir)
    res = run_tool("tools/train.py", "--cfg", "yaml/digits.yaml",
                   *tiny_overrides(digits_root, run_dir, **{"optim.iters": 4, "model.arch": "resnet18"}))
    assert_one_line_error(res, "ckpt_000000002.pt", "arch='resnet10'", "'resnet18'")
    after = snapshot(run_dir)
    # Nothing that was there is changed (the log files only gain lines).
    for name, digest in before.items():
        if not name.startswith("log_rank"):
            assert after[name] == digest, name


def test_export_of_missing_checkpoint(tmp_path):
    res = run_tool("tools/export.py", str(tmp_path), "--out", str(tmp_path / "x.pth"))
    assert_one_line_error(res, "no checkpoint found")
