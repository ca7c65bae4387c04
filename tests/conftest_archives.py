"""Small archives of the paper's Table 1 data sets, written in the exact formats torchvision downloads
(so that torchvision's own data set classes read them too): CIFAR-10, CIFAR-100, SVHN, STL-10.

Each writer takes the folder torchvision would be given and returns it. The images are not noise:
a class is a digit glyph (its last digit) in a colour (CIFAR-100: the colour its tens), drawn at a
random size and place on a dark noisy background, so a small network learns them. Seeded: the same
bytes on every run. A few hundred images are written in well under a second.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

# 5 x 7 glyphs of the digits 0..9
_GLYPHS = [
    "01110 10001 10011 10101 11001 10001 01110", "00100 01100 00100 00100 00100 00100 01110",
    "01110 10001 00001 00010 00100 01000 11111", "11110 00001 00001 01110 00001 00001 11110",
    "00010 00110 01010 10010 11111 00010 00010", "11111 10000 11110 00001 00001 10001 01110",
    "00110 01000 10000 11110 10001 10001 01110", "11111 00001 00010 00100 01000 01000 01000",
    "01110 10001 10001 01110 10001 10001 01110", "01110 10001 10001 01111 00001 00010 01100",
]
GLYPHS = [np.array([[c == "1" for c in row] for row in g.split()], dtype=bool) for g in _GLYPHS]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm").split()
CIFAR100_COARSE = [f"superclass_{i:02d}" for i in range(20)]
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def _hue(index: int, count: int = 10) -> np.ndarray:
    """A saturated RGB colour (0..255), `index` of `count` around the colour wheel."""
    h = 6.0 * index / count
    x = 1.0 - abs(h % 2.0 - 1.0)
    rgb = [(1, x, 0), (x, 1, 0), (0, 1, x), (0, x, 1), (x, 0, 1), (1, 0, x)][int(h) % 6]
    return 40.0 + 200.0 * np.array(rgb)


def class_images(labels: np.ndarray, size: int, rng: np.random.Generator, hundred: bool = False) -> np.ndarray:
    """uint8 (N, size, size, 3) HWC: image i shows the glyph of labels[i] % 10 in the colour of
    labels[i] (of labels[i] // 10 where `hundred`), plus noise."""
    n = len(labels)
    out = np.empty((n, size, size, 3), dtype=np.float32)
    out[:] = rng.uniform(0, 50, (n, 1, 1, 3))
    top = max(1, size // 8)
    for i, label in enumerate(labels.tolist()):
        cell = int(rng.integers(max(1, (3 * top) // 4), top + 1))
        mask = np.kron(GLYPHS[label % 10], np.ones((cell, cell), dtype=bool))
        y = int(rng.integers(0, size - mask.shape[0] + 1))
        x = int(rng.integers(0, size - mask.shape[1] + 1))
        colour = _hue(label // 10 if hundred else label) + rng.uniform(-20, 20, 3)
        out[i, y:y + mask.shape[0], x:x + mask.shape[1]][mask] = colour
    out += 12.0 * rng.standard_normal(out.shape, dtype=np.float32)
    return np.clip(out, 0, 255, out=out).round(out=out).astype(np.uint8)


def _balanced(count_per_class: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    labels = np.repeat(np.arange(classes), count_per_class)
    return labels[rng.permutation(len(labels))]


def _rows(images: np.ndarray) -> np.ndarray:
    """CIFAR's rows: an image's red, green and blue planes, each row-major."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1)


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _filenames(labels: np.ndarray, classes: list[str], start: int) -> list[str]:
    return [f"{classes[c]}_s_{start + i:06d}.png" for i, c in enumerate(labels.tolist())]


def write_cifar10(root: Path | str, per_class_train: int, per_class_test: int, seed: int = 0,
                  size: int = 32) -> Path:
    """root/cifar-10-batches-py/ as torchvision downloads it: data_batch_1..5 (the training images
    shuffled, split into five), test_batch and batches.meta. `size` other than 32 writes images of
    that side (3 * size * size bytes a row): no longer CIFAR, for testing refusals."""
    root = Path(root)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train = _balanced(per_class_train, 10, rng)
    test = _balanced(per_class_test, 10, rng)
    train_rows = _rows(class_images(train, size, rng))
    test_rows = _rows(class_images(test, size, rng))
    chunks = np.array_split(np.arange(len(train)), 5)
    for b, idx in enumerate(chunks, start=1):
        _pickle(folder / f"data_batch_{b}", {
            "batch_label": f"training batch {b} of 5", "labels": train[idx].tolist(), "data": train_rows[idx],
            "filenames": _filenames(train[idx], CIFAR10_CLASSES, int(idx[0]) if len(idx) else 0)})
    _pickle(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": test.tolist(),
                                    "data": test_rows, "filenames": _filenames(test, CIFAR10_CLASSES, 0)})
    _pickle(folder / "batches.meta", {"num_cases_per_batch": max(len(c) for c in chunks),
                                      "label_names": list(CIFAR10_CLASSES), "num_vis": 3 * size * size})
    return root


def write_cifar100(root: Path | str, per_class_train: int, per_class_test: int, seed: int = 0,
                   size: int = 32) -> Path:
    """root/cifar-100-python/ as torchvision downloads it: train, test and meta (fine and coarse
    labels and names; the coarse ones synthetic: fine // 5)."""
    root = Path(root)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        labels = _balanced(per_class, 100, rng)
        _pickle(folder / split, {
            "filenames": _filenames(labels, CIFAR100_CLASSES, 0), "batch_label": f"{split}ing batch 1 of 1",
            "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist(),
            "data": _rows(class_images(labels, size, rng, hundred=True))})
    _pickle(folder / "meta", {"fine_label_names": list(CIFAR100_CLASSES), "coarse_label_names": CIFAR100_COARSE})
    return root


def write_svhn(root: Path | str, n_train: int, n_test: int, n_extra: int = 0, seed: int = 0,
               label_dtype: type = np.uint8) -> Path:
    """root/train_32x32.mat, root/test_32x32.mat (and root/extra_32x32.mat when n_extra), MATLAB v5
    files (compressed, as MATLAB saves them) with X uint8 (32, 32, 3, N) and y (N, 1), the digit 0
    stored as 10. Labels cycle through the digits, shuffled."""
    import scipy.io

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test), ("extra", n_extra)):
        if split == "extra" and not n:
            continue
        digits = (np.arange(n) % 10)[rng.permutation(n)]
        x = class_images(digits, 32, rng).transpose(1, 2, 3, 0)
        y = np.where(digits == 0, 10, digits).astype(label_dtype).reshape(n, 1)
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y}, do_compression=True)
    return root


def _stl_bytes(images: np.ndarray) -> bytes:
    """STL-10's layout: per image the three planes, each column by column."""
    return np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tobytes()


def write_stl10(root: Path | str, per_class_train: int, per_class_test: int, n_unlabeled: int,
                seed: int = 0) -> Path:
    """root/stl10_binary/ as torchvision downloads it: train_X.bin, train_y.bin (classes 1..10),
    test_X.bin, test_y.bin, unlabeled_X.bin (images of random classes), class_names.txt and
    fold_indices.txt (ten folds of the training images)."""
    root = Path(root)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        labels = _balanced(per_class, 10, rng)
        (folder / f"{split}_X.bin").write_bytes(_stl_bytes(class_images(labels, 96, rng)))
        (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
    unlabeled = rng.integers(0, 10, n_unlabeled)
    (folder / "unlabeled_X.bin").write_bytes(_stl_bytes(class_images(unlabeled, 96, rng)))
    (folder / "class_names.txt").write_text("".join(f"{c}\n" for c in STL10_CLASSES))
    folds = np.array_split(rng.permutation(10 * per_class_train), 10)
    (folder / "fold_indices.txt").write_text("".join(" ".join(map(str, f.tolist())) + "\n" for f in folds))
    return root
