"""Data checks that run before any training: class folders of val against train, and a decode
of every val and labeled image before the first step (not at the final evaluation)."""
import re
import shutil

import pytest

from conftest import assert_one_line_error, call_tool, tiny_overrides
from conftest_data import load_tool

pytestmark = pytest.mark.timeout(1200)
check_data = load_tool("check_data")


def test_check_data_flags_val_class_missing_from_train(corrupt_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(corrupt_root, root)
    (root / "train" / "1" / "bad.jpg").unlink()
    assert check_data.main([str(root), "--quiet"]) == 0
    shutil.copytree(root / "val" / "1", root / "val" / "2")
    assert check_data.main([str(root), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"{root / 'val' / '2'}: class folder not in train/" in out


def test_fast_decode_check_catches_what_the_full_one_does(corrupt_root, tmp_path):
    from simmatch.images.decode import find_undecodable, image_problem

    good = sorted((corrupt_root / "train" / "0").iterdir())
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    files = good + [corrupt_root / "train" / "1" / "bad.jpg", text, tmp_path / "missing.jpg"]
    expected = [(str(p), image_problem(p)) for p in files if image_problem(p) is not None]
    assert len(expected) == 3
    assert find_undecodable(files, threads=3) == expected


def test_corrupt_val_and_labeled_images_stop_the_run_before_training(digits_root, tmp_path):
    data, run_dir = tmp_path / "data", tmp_path / "run"
    shutil.copytree(digits_root, data)
    val_bad = sorted((data / "val" / "3").iterdir())[2]
    val_bad.write_bytes(val_bad.read_bytes()[:100])
    lab_bad = data / "train" / "1" / "labeled_bad.jpg"
    lab_bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    lst = tmp_path / "labeled.txt"
    lst.write_text("".join(f"{c}/{sorted((data / 'train' / str(c)).iterdir())[0].name}\n" for c in range(10))
                   + "1/labeled_bad.jpg\n")
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml",  # stops before training: in this process
                    *tiny_overrides(data, run_dir, **{"data.labeled_list": str(lst)}))
    assert_one_line_error(res, "2 val or labeled images cannot be decoded", str(val_bad), str(lab_bad))
    assert "it 1/" not in res.stdout  # stopped before the first step
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "config.yaml").exists()


@pytest.mark.parametrize("name, why, shown", [
    (b"caf\xe9.jpg", "its name is not UTF-8", "caf\\xe9.jpg"),
    (b"two\nlines.jpg", "its name holds a line break", "two\\nlines.jpg"),
])
def test_names_no_split_list_can_hold_are_refused_in_one_line(corrupt_root, tmp_path, capsys, name, why, shown):
    """A non-UTF-8 name used to crash every start (UnicodeEncodeError writing the split) and a
    name with a newline trained but could never resume; check_data passed both."""
    import os

    root = tmp_path / "data"
    shutil.copytree(corrupt_root, root)
    (root / "train" / "1" / "bad.jpg").unlink()
    good = (root / "train" / "0" / sorted(os.listdir(root / "train" / "0"))[0]).read_bytes()
    with open(os.path.join(os.fsencode(root / "train" / "1"), name), "wb") as f:
        f.write(good)
    assert check_data.main([str(root), "--quiet"]) == 1
    assert f"{root / 'train' / '1'}/{shown}: {why}" in capsys.readouterr().out
    overrides = tiny_overrides(root, tmp_path / "run", **{"data.num_classes": 2, "data.labeled_per_class": 2})
    for args in ([], ["--check"]):
        res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", *args, *overrides)
        if args:
            assert res.returncode == 1 and f"train/1/{shown}: {why}" in res.stdout, res.stdout
        else:
            assert_one_line_error(res, f"{root / 'train' / '1'}/{shown}: {why}", "rename it")
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "splits").exists()


def test_running_out_of_file_descriptors_is_named_as_such(corrupt_root):
    """With `ulimit -n` too low every open fails: that used to read as "N images cannot be decoded"."""
    import os
    import resource

    from simmatch.errors import DataError
    from simmatch.images.decode import find_undecodable

    files = sorted((corrupt_root / "train" / "0").iterdir())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.open(os.devnull, os.O_RDONLY)  # a new file gets the lowest free number
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no number left below the limit
    try:
        with pytest.raises(DataError, match=r"too many open files: the file-descriptor limit \(ulimit -n \d+\)"):
            find_undecodable(files, threads=4)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert find_undecodable(files, threads=4) == []


def test_full_check_decodes_every_image_and_check_data_says_how_fast(corrupt_root, tmp_path, capsys):
    """`--check --full` names every bad training image (not a sample); check_data ends with a
    summary line: how many images, how long, images/s, threads."""
    overrides = tiny_overrides(corrupt_root, tmp_path / "run", **{"data.num_classes": 2, "data.labeled_per_class": 2})
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", "--check", "--full", *overrides)
    assert res.returncode == 1
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("FAIL  images decode (--full)"))
    assert f"1 images cannot be decoded: {corrupt_root / 'train' / '1' / 'bad.jpg'}" in line
    assert check_data.main([str(corrupt_root), "--quiet", "--workers", "2"]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"decoded 25 images in [0-9.]+ s \([0-9,]+ images/s, 2 threads\): 1 problems", last), last
