"""simmatch.archives: the Table 1 data sets read as torchvision downloads them. Each reader against
torchvision's own data set class reading the same files (checksums off: the files are small ones
tests/conftest_archives.py writes in the same formats); every refusal one line naming the file."""
from __future__ import annotations

import ast
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest_archives import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    STL10_CLASSES,
    write_cifar10,
    write_cifar100,
    write_stl10,
    write_svhn,
)

from simmatch.archives import ARCHIVE_FOLDER, Arrays, expected_files, read_archive
from simmatch.errors import ConfigError, DataError

PACKAGE = Path(__file__).resolve().parents[2] / "simmatch" / "archives"


def torchvision_reference(name: str, root: Path, split: str):
    """torchvision's data set class for `name`, its checksums of the real files switched off."""
    from torchvision import datasets

    def unchecked(entries):
        return [[entry[0], None] for entry in entries]

    if name in ("cifar10", "cifar100"):
        base = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        cls = type("Unchecked", (base,), {"train_list": unchecked(base.train_list),
                                          "test_list": unchecked(base.test_list), "meta": {**base.meta, "md5": None}})
        return cls(str(root), train=split == "train", download=False)
    if name == "svhn":
        base = datasets.SVHN
        cls = type("Unchecked", (base,), {"split_list": {k: [v[0], v[1], None] for k, v in base.split_list.items()}})
        return cls(str(root), split=split, download=False)
    base = datasets.STL10
    cls = type("Unchecked", (base,), {"train_list": unchecked(base.train_list), "test_list": unchecked(base.test_list)})
    return cls(str(root), split=split, download=False)


def reference_arrays(name: str, root: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images N x H x W x 3, labels, classes) as torchvision reads them."""
    ds = torchvision_reference(name, root, split)
    if name in ("cifar10", "cifar100"):
        return np.asarray(ds.data), np.asarray(ds.targets, dtype=np.int64), list(ds.classes)
    images = np.asarray(ds.data).transpose(0, 2, 3, 1)  # torchvision holds SVHN and STL-10 as N x C x H x W
    classes = list(getattr(ds, "classes", [str(d) for d in range(10)]))
    return images, np.asarray(ds.labels).astype(np.int64), classes


@pytest.fixture(scope="module")
def table1_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("table1")
    write_cifar10(root, 12, 5, seed=1)
    write_cifar100(root, 2, 1, seed=2)
    write_svhn(root, 120, 40, n_extra=60, seed=3)
    write_stl10(root, 4, 2, 30, seed=4)
    return root


def refusal(name: str, root: Path, split: str = "train", extra: bool = False, error=DataError) -> str:
    with pytest.raises(error) as caught:
        read_archive(name, root, split, extra)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message and " object at 0x" not in message, message
    return message


def same(arrays: Arrays, images: np.ndarray, labels: np.ndarray) -> None:
    assert arrays.images.dtype == np.uint8 and arrays.images.shape == images.shape
    assert arrays.labels.dtype == np.int64 and arrays.labels.shape == (len(images),)
    np.testing.assert_array_equal(arrays.images, images)
    np.testing.assert_array_equal(arrays.labels, labels)


# ---- the readers against torchvision's --------------------------------------------------------

@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_table1_cifar_equals_torchvision(table1_root, name, split):
    arrays = read_archive(name, table1_root, split)
    images, labels, classes = reference_arrays(name, table1_root, split)
    same(arrays, images, labels)
    assert arrays.images.flags.c_contiguous and arrays.images.flags.writeable
    assert arrays.classes == classes == (CIFAR10_CLASSES if name == "cifar10" else CIFAR100_CLASSES)
    assert arrays.files == [str(p) for p in expected_files(name, table1_root, split=split)]
    assert len(arrays) == {("cifar10", "train"): 120, ("cifar10", "test"): 50, ("cifar100", "train"): 200,
                           ("cifar100", "test"): 100}[name, split]


@pytest.mark.parametrize("split", ["train", "test"])
def test_table1_svhn_equals_torchvision(table1_root, split):
    arrays = read_archive("svhn", table1_root, split)
    images, labels, _ = reference_arrays("svhn", table1_root, split)
    same(arrays, images, labels)
    assert arrays.images.flags.c_contiguous
    assert arrays.classes == [str(d) for d in range(10)]
    assert set(arrays.labels.tolist()) == set(range(10))  # the digit 0 (stored as 10) is class 0


def test_table1_svhn_extra_follows_train(table1_root):
    arrays = read_archive("svhn", table1_root, "train", extra=True)
    train_images, train_labels, _ = reference_arrays("svhn", table1_root, "train")
    extra_images, extra_labels, _ = reference_arrays("svhn", table1_root, "extra")
    same(arrays, np.concatenate([train_images, extra_images]), np.concatenate([train_labels, extra_labels]))
    assert arrays.names[:120] == read_archive("svhn", table1_root, "train").names
    assert arrays.names[120:] == [f"extra/{i:02d}" for i in range(60)]
    assert [Path(f).name for f in arrays.files] == ["train_32x32.mat", "extra_32x32.mat"]


def test_table1_svhn_labels_stored_as_doubles(tmp_path):
    write_svhn(tmp_path, 30, 10, label_dtype=np.float64)
    images, labels, _ = reference_arrays("svhn", tmp_path, "train")
    same(read_archive("svhn", tmp_path, "train"), images, labels)


@pytest.mark.parametrize("split", ["train", "test", "unlabeled"])
def test_table1_stl10_equals_torchvision(table1_root, split):
    arrays = read_archive("stl10", table1_root, split)
    images, labels, classes = reference_arrays("stl10", table1_root, split)
    same(arrays, images, labels)
    assert arrays.classes == classes == STL10_CLASSES
    if split == "unlabeled":
        assert (arrays.labels == -1).all()
        # a read-only view of the mapped file, not a copy
        assert not arrays.images.flags.writeable and not arrays.images.flags.owndata
        np.testing.assert_array_equal(np.ascontiguousarray(arrays.images[3:7]), images[3:7])
    else:
        assert arrays.images.flags.c_contiguous and arrays.images.flags.writeable


def test_table1_names_unique_and_stable(table1_root):
    for name, splits in (("cifar10", ["train", "test"]), ("cifar100", ["train", "test"]),
                         ("svhn", ["train", "test"]), ("stl10", ["train", "test", "unlabeled"])):
        names = []
        for split in splits:
            extra = name == "svhn" and split == "train"
            arrays = read_archive(name, table1_root, split, extra)
            assert arrays.names == read_archive(name, table1_root, split, extra).names
            assert len(arrays.names) == len(arrays.images)
            assert all(n.startswith(f"{split}/") or n.startswith("extra/") for n in arrays.names)
            names += arrays.names
        assert len(set(names)) == len(names)
        assert all("\n" not in n and "\\" not in n and not n.startswith("/") for n in names)
    assert read_archive("cifar10", table1_root, "train").names[7] == "train/007"  # 120 images: 3 digits
    assert read_archive("stl10", table1_root, "unlabeled").names[-1] == "unlabeled/29"


def test_table1_expected_files(table1_root):
    assert ARCHIVE_FOLDER == {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "svhn": "",
                              "stl10": "stl10_binary"}
    cifar = expected_files("cifar10", table1_root)
    assert [p.name for p in cifar] == [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    assert [p.name for p in expected_files("cifar100", table1_root)] == ["train", "test", "meta"]
    assert [p.name for p in expected_files("svhn", table1_root, extra=True)] == [
        "train_32x32.mat", "extra_32x32.mat", "test_32x32.mat"]
    assert [p.name for p in expected_files("stl10", table1_root, split="unlabeled")] == [
        "unlabeled_X.bin", "class_names.txt"]
    for name in ("cifar10", "cifar100", "svhn", "stl10"):
        assert all(p.is_file() for p in expected_files(name, table1_root, extra=name == "svhn"))


def glyph_colour(arrays: Arrays) -> np.ndarray:
    """The chromaticity of each image's brightest 5% of pixels (its glyph)."""
    pixels = arrays.images.reshape(len(arrays), -1, 3).astype(np.float32)
    top = np.argsort(pixels.sum(-1), axis=1)[:, -(pixels.shape[1] // 20):]
    colour = np.take_along_axis(pixels, top[..., None], axis=1).mean(axis=1)
    return colour / colour.sum(-1, keepdims=True)


def test_table1_written_images_are_learnable(tmp_path):
    """The classes differ: a nearest-class-mean on the glyph's colour tells the CIFAR-10 test images
    apart, and CIFAR-100's by their tens."""
    write_cifar10(tmp_path, 30, 10, seed=5)
    write_cifar100(tmp_path, 5, 2, seed=5)
    for name, group in (("cifar10", 1), ("cifar100", 10)):
        train, test = read_archive(name, tmp_path, "train"), read_archive(name, tmp_path, "test")
        feats = [glyph_colour(train), glyph_colour(test)]
        means = np.stack([feats[0][train.labels // group == c].mean(axis=0) for c in range(10)])
        guess = np.argmin(((feats[1][:, None] - means[None]) ** 2).sum(-1), axis=1)
        assert (guess == test.labels // group).mean() > 0.9, name


def test_table1_package_imports_no_torch():
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("torch", "torchvision") for n in names), path


# ---- refusals: missing -----------------------------------------------------------------------

@pytest.mark.parametrize("name,split,file,command", [
    ("cifar10", "train", "data_batch_3", "torchvision.datasets.CIFAR10("),
    ("cifar10", "test", "batches.meta", "torchvision.datasets.CIFAR10("),
    ("cifar100", "test", "test", "torchvision.datasets.CIFAR100("),
    ("svhn", "test", "test_32x32.mat", "torchvision.datasets.SVHN("),
    ("stl10", "unlabeled", "unlabeled_X.bin", "torchvision.datasets.STL10("),
    ("stl10", "train", "class_names.txt", "torchvision.datasets.STL10("),
])
def test_table1_missing_file(table1_root, tmp_path, name, split, file, command):
    shutil.copytree(table1_root, tmp_path, dirs_exist_ok=True)
    (tmp_path / ARCHIVE_FOLDER[name] / file).unlink()
    message = refusal(name, tmp_path, split)
    assert str(tmp_path / ARCHIVE_FOLDER[name] / file) in message and "is missing" in message
    assert command in message and "download=True" in message and repr(str(tmp_path)) in message


def test_table1_missing_svhn_extra(table1_root, tmp_path):
    write_svhn(tmp_path, 20, 10)
    message = refusal("svhn", tmp_path, "train", extra=True)
    assert "extra_32x32.mat" in message and "split='extra'" in message
    assert len(read_archive("svhn", tmp_path, "train")) == 20


def test_table1_missing_folder_hints(table1_root, tmp_path):
    message = refusal("cifar10", tmp_path / "nowhere")
    assert "nowhere does not exist" in message and "CIFAR10(" in message
    message = refusal("cifar10", table1_root / "cifar-10-batches-py")
    assert f"give the folder above it, {table1_root}, as the root" in message and "download" not in message
    write_cifar100(tmp_path, 1, 1)
    message = refusal("cifar10", tmp_path)
    assert "data_batch_1 is missing (and 5 more" in message and "read it as cifar100" in message
    message = refusal("stl10", tmp_path / "two\nlines")  # printed on one line all the same
    assert "two\\nlines" in message


# ---- refusals: truncated ---------------------------------------------------------------------

def cut(path: Path, keep: int | None = None, drop: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep is not None else data[:len(data) - drop])


@pytest.mark.parametrize("name,split,file", [
    ("cifar10", "train", "data_batch_2"), ("cifar10", "test", "batches.meta"), ("cifar100", "train", "train"),
    ("svhn", "train", "train_32x32.mat"), ("svhn", "test", "test_32x32.mat"),
])
def test_table1_truncated_pickle_or_mat(table1_root, tmp_path, name, split, file):
    shutil.copytree(table1_root, tmp_path, dirs_exist_ok=True)
    path = tmp_path / ARCHIVE_FOLDER[name] / file
    for keep in (path.stat().st_size // 2, path.stat().st_size - 1, 10):
        cut(path, keep=keep)
        message = refusal(name, tmp_path, split)
        assert str(path) in message and "truncated or damaged" in message and "download=True" in message


def test_table1_truncated_stl10(table1_root, tmp_path):
    shutil.copytree(table1_root, tmp_path, dirs_exist_ok=True)
    folder = tmp_path / "stl10_binary"
    cut(folder / "train_X.bin", drop=100)
    message = refusal("stl10", tmp_path, "train")
    assert str(folder / "train_X.bin") in message and "not a whole number of 96x96 RGB images" in message
    cut(folder / "train_X.bin", drop=96 * 96 * 3 - 100)  # one image short of the labels
    message = refusal("stl10", tmp_path, "train")
    assert str(folder / "train_y.bin") in message and "40 labels but train_X.bin holds 39 images" in message
    cut(folder / "test_y.bin", drop=1)
    assert str(folder / "test_y.bin") in refusal("stl10", tmp_path, "test")
    cut(folder / "unlabeled_X.bin", keep=0)
    message = refusal("stl10", tmp_path, "unlabeled")
    assert str(folder / "unlabeled_X.bin") in message and "empty" in message


# ---- refusals: foreign -----------------------------------------------------------------------

def put_pickle(path: Path, obj) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


# A pickle of {"data": os.system("echo planted")}, by hand: pickle.load would run the command.
PLANTED = b"(dp0\nVdata\np1\ncos\nsystem\np2\n(Vecho planted\ntRp3\ns."


def test_table1_foreign_cifar(table1_root, tmp_path):
    shutil.copytree(table1_root, tmp_path, dirs_exist_ok=True)
    c10, c100 = tmp_path / "cifar-10-batches-py", tmp_path / "cifar-100-python"
    shutil.copy(c100 / "train", c10 / "data_batch_3")
    message = refusal("cifar10", tmp_path)
    assert str(c10 / "data_batch_3") in message and "is a CIFAR-100 batch" in message
    shutil.copy(c10 / "test_batch", c100 / "test")
    assert "is a CIFAR-10 batch" in refusal("cifar100", tmp_path, "test")
    shutil.copy(c100 / "meta", c10 / "batches.meta")
    message = refusal("cifar10", tmp_path, "test")
    assert str(c10 / "batches.meta") in message and "CIFAR-100's meta file" in message

    shutil.copytree(table1_root, tmp_path, dirs_exist_ok=True)
    cases = {
        "holds no labels entry": {"data": np.zeros((2, 3072), np.uint8), "names": ["a", "b"]},
        "holds no data entry": {"labels": [0, 1]},
        "holds a list": [1, 2, 3],
        "its data is (2, 3072) int64": {"data": np.zeros((2, 3072), np.int64), "labels": [0, 1]},
        "it holds 3 labels for 2 images": {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1, 2]},
        "label 10 (of image 1) is outside 0..9": {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]},
        "labels are not whole numbers": {"data": np.zeros((2, 3072), np.uint8), "labels": ["cat", "dog"]},
    }
    for expected, obj in cases.items():
        put_pickle(c10 / "data_batch_5", obj)
        message = refusal("cifar10", tmp_path)
        assert str(c10 / "data_batch_5") in message and expected in message, message
    (c10 / "data_batch_5").write_bytes(PLANTED)
    message = refusal("cifar10", tmp_path)
    assert "refers to os.system" in message and "refused without loading it" in message
    put_pickle(c10 / "batches.meta", {"label_names": ["a", "b"]})
    assert "names 2 classes, CIFAR-10 has 10" in refusal("cifar10", tmp_path, "test")


def test_table1_foreign_cifar_image_size(tmp_path):
    write_cifar10(tmp_path, 2, 1, size=30)
    message = refusal("cifar10", tmp_path, "test")
    assert "test_batch" in message and "its data is (10, 2700) uint8, not (N, 3072) uint8" in message


def test_table1_foreign_svhn(tmp_path):
    import scipy.io

    write_svhn(tmp_path, 20, 10)
    path = tmp_path / "test_32x32.mat"
    x = np.zeros((32, 32, 3, 4), np.uint8)
    cases = {
        "holds no variable X": {"images": x, "y": np.ones((4, 1), np.uint8)},
        "holds no variable y": {"X": x},
        "its X is (4, 32, 32, 3) uint8": {"X": x.transpose(3, 0, 1, 2), "y": np.ones((4, 1), np.uint8)},
        "its X is (32, 32, 3, 4) float64": {"X": x.astype(np.float64), "y": np.ones((4, 1), np.uint8)},
        "label 0 (of image 2) is outside 1..10": {"X": x, "y": np.array([[1], [10], [0], [3]], np.uint8)},
        "label 11 (of image 0) is outside 1..10": {"X": x, "y": np.array([[11], [10], [1], [3]], np.uint8)},
        "it holds 3 labels (y) for 4 images": {"X": x, "y": np.ones((3, 1), np.uint8)},
        "are not whole numbers": {"X": x, "y": np.full((4, 1), 1.5)},
    }
    for expected, variables in cases.items():
        scipy.io.savemat(path, variables)
        message = refusal("svhn", tmp_path, "test")
        assert str(path) in message and expected in message, message
    path.write_text("not a MATLAB file at all\n" * 20)
    assert "does not load as a MATLAB file" in refusal("svhn", tmp_path, "test")


def test_table1_svhn_without_scipy(tmp_path, monkeypatch):
    write_svhn(tmp_path, 10, 10)
    monkeypatch.setitem(__import__("sys").modules, "scipy.io", None)
    message = refusal("svhn", tmp_path, "test")
    assert "needs scipy (pip install scipy)" in message and "test_32x32.mat" in message


def test_table1_foreign_stl10(tmp_path):
    write_stl10(tmp_path, 1, 1, 2)
    folder = tmp_path / "stl10_binary"
    (folder / "train_y.bin").write_bytes(bytes([1, 2, 3, 4, 5, 6, 7, 8, 9, 0]))
    message = refusal("stl10", tmp_path, "train")
    assert str(folder / "train_y.bin") in message and "label 0 (of image 9) is outside 1..10" in message
    (folder / "test_y.bin").write_bytes(bytes([11] * 10))
    assert "label 11 (of image 0) is outside 1..10" in refusal("stl10", tmp_path, "test")
    (folder / "class_names.txt").write_text("airplane\nbird\n")
    message = refusal("stl10", tmp_path, "unlabeled")
    assert str(folder / "class_names.txt") in message and "holds 2 lines" in message


def test_table1_unknown_request(table1_root):
    assert "unknown archive 'mnist'" in refusal("mnist", table1_root, error=ConfigError)
    assert "has no unlabeled split" in refusal("cifar10", table1_root, "unlabeled", error=ConfigError)
    assert "unknown split 'val'" in refusal("svhn", table1_root, "val", error=ConfigError)
    assert "extra=True" in refusal("cifar100", table1_root, "train", extra=True, error=ConfigError)
    assert "extra=True" in refusal("svhn", table1_root, "test", extra=True, error=ConfigError)
