"""Bad input: one `error:` line naming the culprit, exit 2, no traceback, nothing overwritten.

The tools run in this process (conftest.call_tool): the refusals come before any training (the
command lines themselves are run by the slow tests of tests/engine/test_train.py and others)."""
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, assert_one_line_error, call_tool, tiny_overrides


def snapshot(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_unknown_key(digits_root, tmp_path):
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", *tiny_overrides(digits_root, tmp_path / "r"),
                   "train.batchsize=4")
    assert_one_line_error(res, "train.batchsize", "(did you mean 'train.batch_size'?)")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("key, hint", [("optim.lrr", "optim.lr"), ("optm.lr", "optim"), ("optim.zzzz", None)])
def test_unknown_key_suggests_the_nearest(key, hint):
    from simmatch.config import load_config
    from simmatch.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}=0.1"])
    assert str(err.value).endswith(f"(did you mean '{hint}'?)" if hint else f"'{key}'")


def test_missing_config_file(tmp_path):
    res = call_tool("tools/train.py", "--cfg", str(tmp_path / "nope.yaml"))
    assert_one_line_error(res, "nope.yaml")


def test_missing_data_dir(tmp_path):
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml",
                   *tiny_overrides(tmp_path / "no_such_data", tmp_path / "r"))
    assert_one_line_error(res, "no_such_data")


def test_missing_split_file(digits_root, tmp_path):
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", *tiny_overrides(digits_root, tmp_path / "r"),
                   f"data.labeled_list={tmp_path / 'labels.txt'}")
    assert_one_line_error(res, "labels.txt")


def test_batch_not_divisible_by_world_size(digits_root, tmp_path):
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", "--nproc", "2",
                   *tiny_overrides(digits_root, tmp_path / "r", **{"train.batch_size": 7}))
    assert_one_line_error(res, "train.batch_size=7", "world size 2")


def test_checkpoint_of_another_architecture(trained_run, digits_root):
    run_dir = trained_run("r", **{"optim.iters": 2})  # a finished resnet10 run
    before = snapshot(run_dir)
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml",
                    *tiny_overrides(digits_root, run_dir, **{"optim.iters": 4, "model.arch": "resnet18"}))
    # The config check refuses first, naming the key and both values.
    assert_one_line_error(res, "model.arch", "'resnet10' -> 'resnet18'", "train.run_dir")
    assert_unchanged(before, snapshot(run_dir))
    # A saved config edited by hand gets past that check: the checkpoint's own check refuses.
    saved = run_dir / "config.yaml"
    edited = saved.read_text().replace("arch: resnet10", "arch: resnet18")
    assert edited != saved.read_text()
    saved.write_text(edited)
    before = {k: v for k, v in snapshot(run_dir).items() if k != "config.yaml"}
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml",
                    *tiny_overrides(digits_root, run_dir, **{"optim.iters": 2, "model.arch": "resnet18"}))
    assert_one_line_error(res, "ckpt_000000002.pt", "model.arch ('resnet10' -> 'resnet18')")
    assert_unchanged(before, snapshot(run_dir))


def assert_unchanged(before: dict[str, str], after: dict[str, str]) -> None:
    """Nothing that was there is changed (the log files only gain lines)."""
    for name, digest in before.items():
        if not name.startswith("log_rank"):
            assert after[name] == digest, name


def test_export_of_missing_checkpoint(tmp_path):
    res = call_tool("tools/export.py", str(tmp_path), "--out", str(tmp_path / "x.pth"))
    assert_one_line_error(res, "no checkpoint found")


@pytest.mark.parametrize("override, shown, valid", [
    ("optim.lr=-0.1", "optim.lr=-0.1", "(0, inf)"),
    ("optim.base_batch=0", "optim.base_batch=0", "[1, inf)"),
    ("data.num_threads=0", "data.num_threads=0", "[1, inf)"),
    ("optim.lr=.nan", "optim.lr=nan", "(0, inf)"),
    ("optim.lr=.inf", "optim.lr=inf", "(0, inf)"),
    ("method.simmatch.temperature=0", "method.simmatch.temperature=0", "(0, inf)"),
    ("optim.iters=-5", "optim.iters=-5", "[0, inf)"),
    ("optim.warmup_epochs=-2", "optim.warmup_epochs=-2", "[0, inf)"),
    ("optim.weight_decay=-1", "optim.weight_decay=-1", "[0, inf)"),
    ("method.simmatch.tau=2", "method.simmatch.tau=2", "[0, 1]"),
    ("data.val_batch=-4", "data.val_batch=-4", "[0, inf)"),
])
def test_value_out_of_range(digits_root, tmp_path, override, shown, valid):
    run_dir = tmp_path / "r"
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", *tiny_overrides(digits_root, run_dir),
                   override)
    assert_one_line_error(res, shown, valid)
    assert not run_dir.exists()


def test_run_dir_unusable(digits_root, tmp_path):
    (tmp_path / "afile").write_text("x")
    for run_dir, needle in ((tmp_path / "afile", "is a file"),
                            (tmp_path / "afile" / "sub", "lies under")):
        res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", *tiny_overrides(digits_root, run_dir),
                       )
        assert_one_line_error(res, f"train.run_dir={run_dir}", needle)
    assert (tmp_path / "afile").read_text() == "x"


def test_run_dir_read_only(digits_root, tmp_path):
    import os

    run_dir = "/sys/simmatch-run"  # sysfs refuses new folders, even to root
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("no sysfs here")
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", *tiny_overrides(digits_root, run_dir))
    assert_one_line_error(res, f"train.run_dir={run_dir}", "cannot be created")


def test_failed_run_leaves_no_config(digits_root, tmp_path):
    """A run stopped by its data checks writes no config.yaml for the next run to inherit."""
    run_dir = tmp_path / "r"
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml",
                   *tiny_overrides(digits_root, run_dir, **{"data.num_classes": 7}), )
    assert_one_line_error(res, "data.num_classes=7")
    assert not (run_dir / "config.yaml").exists()


@pytest.mark.slow  # a fresh interpreter, to see what it imported
def test_a_missing_data_tree_is_named_before_torch_is_imported(tmp_path):
    code = ("import atexit, runpy, sys\n"  # the tool ends through atexit (simmatch/launch/process.py)
            "atexit.register(lambda: print('torch imported:', 'torch' in sys.modules))\n"
            f"sys.argv = ['tools/train.py', '--cfg', 'yaml/digits.yaml', 'data.root={tmp_path / 'absent'}']\n"
            "runpy.run_path('tools/train.py', run_name='__main__')\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (res.returncode, res.stdout.strip()) == (2, "torch imported: False"), (res.stdout, res.stderr)
    assert res.stderr.strip() == f"error: data directory not found: {tmp_path / 'absent'}"
