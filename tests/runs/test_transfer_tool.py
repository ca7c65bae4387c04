"""tools/transfer.py on real images and a trained network: the digits tree's features of the tiny
shared run, scored against scikit-learn's LogisticRegression on the same cached features; the
cache written once and read after; an export (model card), its .pth and the run directory giving
the same features; a Table 1 archive; one command-line refusal."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, call_tool, run_tool

pytestmark = pytest.mark.slow


def transfer(*args: str) -> tuple[dict, str]:
    res = call_tool("tools/transfer.py", *map(str, args))
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1]), res.stdout


def cached(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def folder_labels(files: list[str]) -> np.ndarray:
    """Class index of each `class/image` name: the sorted class folders, counted here."""
    classes = sorted({f.split("/")[0] for f in files})
    return np.array([classes.index(f.split("/")[0]) for f in files])


def sklearn_scores(train_x, train_y, test_x, test_y, c: float) -> tuple[float, float]:
    """Top-1 and mean per-class accuracy (%) of scikit-learn's multinomial L-BFGS logistic regression."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, solver="lbfgs", max_iter=5000, tol=1e-8)
    predicted = clf.fit(train_x.astype(np.float64), train_y).predict(test_x.astype(np.float64))
    per_class = [100.0 * np.mean(predicted[test_y == k] == k) for k in np.unique(test_y)]
    return 100.0 * float(np.mean(predicted == test_y)), float(np.mean(per_class))


def test_transfer_agrees_with_sklearn_on_digits_features(trained_run, digits_root, tmp_path):
    """One L2 weight (no choice): the refit on train + validation is a fit on every training image.
    The objective mean CE + l2/2 |W|^2 is scikit-learn's C * sum CE + 1/2 |W|^2 divided by C n, so
    C = 1 / (l2 n); the top-1 and the mean per-class accuracy agree within 0.5 points, and the
    mapping without n (C = 1 / l2) does not."""
    run = trained_run()
    l2 = 1e-2
    top1, out = transfer(run, digits_root, "--l2", l2, "--cache", tmp_path / "cache", "--device", "cpu")
    mpc, out_mpc = transfer(run, digits_root, "--l2", l2, "--cache", tmp_path / "cache", "--device", "cpu",
                            "--metric", "mean_per_class")
    saved = cached(top1["cache"])
    train_x, test_x = saved["features"]["train"].numpy(), saved["features"]["test"].numpy()
    train_y, test_y = folder_labels(saved["files"]["train"]), folder_labels(saved["files"]["test"])
    assert (len(train_y), len(test_y)) == (1402, 395)  # make_digits' split of 1,797 digits
    assert top1["n_train"] + top1["n_val"] == 1402 and top1["n_test"] == 395 and top1["l2"] == l2
    n = len(train_y)
    sk_top1, sk_mpc = sklearn_scores(train_x, train_y, test_x, test_y, 1.0 / (l2 * n))
    assert abs(top1["accuracy"] - sk_top1) <= 0.5, (top1["accuracy"], sk_top1)
    assert abs(mpc["accuracy"] - sk_mpc) <= 0.5, (mpc["accuracy"], sk_mpc)
    wrong_top1, _ = sklearn_scores(train_x, train_y, test_x, test_y, 1.0 / l2)
    assert abs(top1["accuracy"] - wrong_top1) > 0.5, (top1["accuracy"], wrong_top1)  # the control
    assert "read from the cache" in out_mpc  # the second metric needed no new pass
    assert top1["test_split"].endswith("/val") and "val" in out  # digits has no test/: val/ is the test split
    assert set(mpc["per_class"]) == {str(k) for k in range(10)} and "mean per-class accuracy" in out_mpc


def test_transfer_cache_is_written_once_and_read_after(trained_run, digits_root, tmp_path, monkeypatch):
    """The second run reads the features: the network never runs (extraction made to fail), the file
    is the same one (mtime, bytes), and the result is the same."""
    import simmatch.engine.transfer as transfer_module

    run = trained_run()
    args = (run, digits_root, "--l2", "1e-4", "1e-2", "1", "--cache", tmp_path / "cache", "--device", "cpu")
    first, out1 = transfer(*args)
    cache = Path(first["cache"])
    assert "computed and cached in" in out1 and not first["cache_hit"]
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # one file, no temporary left
    stamp, data = cache.stat().st_mtime_ns, cache.read_bytes()

    def no_network(*a, **k):
        raise AssertionError("the network ran although the features were cached")

    monkeypatch.setattr(transfer_module, "extract_features", no_network)
    second, out2 = transfer(*args)
    assert second["cache_hit"] and f"read from the cache {cache}" in out2
    assert cache.stat().st_mtime_ns == stamp and cache.read_bytes() == data
    for key in ("accuracy", "l2", "val_grid", "n_train", "n_val", "n_test"):
        assert second[key] == first[key], key
    res = call_tool("tools/transfer.py", *map(str, args[:-2]), "--which", "student", "--device", "cpu")
    assert res.returncode == 1 and "the network ran" in res.stderr  # another network: another key
    monkeypatch.undo()
    cache.write_bytes(data[: len(data) // 2])  # a damaged cache is computed again and replaced
    third, out3 = transfer(*args)
    assert not third["cache_hit"] and "computed and cached in" in out3
    assert cached(str(cache))["key"] == cache.stem and third["accuracy"] == first["accuracy"]


def test_transfer_export_pth_and_run_give_the_same_features(trained_run, digits_root, tmp_path):
    """The export's model card gives the architecture and preprocessing; the .pth alone needs --arch
    and --size (its stem read from conv1); all three embed the images as the run's teacher does."""
    run = trained_run()
    res = call_tool("tools/export.py", str(run), "--which", "teacher", "--out", str(tmp_path / "exp" / "net"))
    assert res.returncode == 0, res.stderr[-2000:]
    alone = tmp_path / "alone" / "net.pth"
    alone.parent.mkdir()
    alone.write_bytes((tmp_path / "exp" / "net.pth").read_bytes())
    common = ("--l2", "1e-3", "--cache", tmp_path / "cache", "--device", "cpu", "--interpolation", "bilinear")
    from_run, _ = transfer(run, digits_root, *common)
    from_export, out = transfer(tmp_path / "exp" / "net.safetensors", digits_root, *common)
    from_pth, out_pth = transfer(alone, digits_root, *common, "--arch", "resnet10", "--size", "16")
    assert from_export["weights_kind"] == "export" and from_pth["weights_kind"] == "weights"
    assert from_run["arch"] == from_export["arch"] == "resnet10" and from_pth["small_input"]
    assert "shorter side 16 px (bilinear), centre crop 16 px" in out
    feats = [cached(r["cache"])["features"] for r in (from_run, from_export, from_pth)]
    assert len({r["cache"] for r in (from_run, from_export, from_pth)}) == 3
    for other in feats[1:]:
        for split in ("train", "test"):
            assert torch.allclose(other[split], feats[0][split], atol=1e-5)
    assert from_run["accuracy"] == pytest.approx(from_export["accuracy"], abs=0.3)


def test_transfer_reads_a_table1_archive(trained_run, tmp_path):
    """--format cifar10: the digits as a CIFAR-10 archive (make_digits' same split), its training
    and test archives as the splits."""
    from simmatch.data.digits import write_digits_cifar10

    counts = write_digits_cifar10(tmp_path / "archive")
    res, out = transfer(trained_run(), tmp_path / "archive", "--format", "cifar10", "--l2", "1e-3",
                        "--device", "cpu")
    assert res["n_train"] + res["n_val"] == counts["train"] == 1402 and res["n_test"] == counts["val"] == 395
    assert res["classes"] == 10 and "cifar10 test archive" in out
    assert Path(res["cache"]).parent == tmp_path / "archive" / ".features"
    assert res["accuracy"] > 30.0  # well above the 10 % of chance on real features


def test_transfer_command_line_refuses_a_missing_tree(tmp_path):
    res = run_tool("tools/transfer.py", str(tmp_path / "w.pth"), str(tmp_path / "no_tree"))
    assert_one_line_error(res, "DATA_TREE", "no_tree")
