"""Transfer evaluation (tools/transfer.py): the frozen network's features of another data set's
images, cached on disk, then linear evaluation (engine/linear_eval.py) on them.

A data set is a class-folder tree (DATA_TREE/train/<class>/*, DATA_TREE/test/<class>/*, or val/
as the test split when there is no test/; with both, val/ is the validation split) or a Table 1
archive (--format cifar10 ...: its training and test archives). The features of every split are
computed in one pass and saved under a key of the weights' bytes, the preprocessing and the
images' names, sizes and times, so choosing the L2 weight never runs the network again and a
second run reads the file.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from simmatch.engine.representation import embed
from simmatch.engine.transfer_weights import FeatureModel, Preprocess
from simmatch.errors import DataError, UserError
from simmatch.files.atomic import write_atomic
from simmatch.images.source import FolderSource, ImageSource
from simmatch.images.tree import ImageTree, scan_tree

CACHE_VERSION = 1
FORMATS = ("folder", "cifar10", "cifar100", "svhn", "stl10")


@dataclass
class Split:
    """One split's images, where they were found (shown in the output), and their source."""

    name: str  # train | val | test
    where: str
    tree: ImageTree
    source: ImageSource
    archive_files: list[Path] | None = None  # an archive's files (their sizes and times key the cache)


def folder_splits(root: Path) -> dict[str, Split]:
    """train/, and test/ (else val/ as the test split); val/ beside test/ is the validation split."""
    if not root.is_dir():
        raise DataError(f"DATA_TREE {root}: no such directory")
    if not (root / "train").is_dir():
        raise DataError(f"DATA_TREE {root} has no train/ folder (expected {root}/train/<class>/<image> "
                        f"and {root}/test/<class>/<image>, or val/ as the test split)")
    test_dir = "test" if (root / "test").is_dir() else "val" if (root / "val").is_dir() else None
    if test_dir is None:
        raise DataError(f"DATA_TREE {root} has neither a test/ nor a val/ folder: no test split")
    names = {"train": "train", "test": test_dir}
    if test_dir == "test" and (root / "val").is_dir():
        names["val"] = "val"
    return {split: Split(split, str(root / folder), scan_tree(root / folder), FolderSource(root / folder))
            for split, folder in names.items()}


def archive_splits(root: Path, name: str) -> dict[str, Split]:
    """A Table 1 archive as torchvision downloads it into `root`: its training and test archives."""
    from simmatch.archives import expected_files
    from simmatch.config.schema import DataConfig
    from simmatch.shards.formats import Archive

    archive = Archive(DataConfig(root=str(root), format=name))
    archive.require()
    out = {}
    for split, part in (("train", "train"), ("test", "val")):
        tree, source = archive.split(part)
        out[split] = Split(split, f"{name} {'training' if split == 'train' else 'test'} archive in {root}",
                           tree, source, expected_files(name, root, split="train" if split == "train" else "test"))
    return out


def find_splits(root: str | Path, fmt: str = "folder") -> dict[str, Split]:
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    root = Path(root)
    return folder_splits(root) if fmt == "folder" else archive_splits(root, fmt)


def labels_of(split: Split, classes: list[str]) -> list[int]:
    """The split's labels as indices of the training split's classes (a test split may lack some)."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in split.tree.classes if c not in index]
    if unknown:
        raise DataError(f"{split.where} has class {unknown[0]!r}, which the training split "
                        f"{'does not have' if len(unknown) == 1 else f'lacks (with {len(unknown) - 1} more)'}")
    return [index[split.tree.classes[label]] for label in split.tree.labels]


def data_identity(split: Split, fmt: str) -> str:
    """A digest of what the split's features depend on: each image's name, class, size and time
    (a folder), or the archive files' sizes and times and the names and classes in them."""
    sha = hashlib.sha256(f"{fmt}\n{Path(split.tree.root).resolve()}\n".encode())
    if split.archive_files is None:
        for rel, label in zip(split.tree.files, split.tree.labels):
            st = os.stat(split.tree.root / rel)
            sha.update(f"{rel}\t{split.tree.classes[label]}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return sha.hexdigest()
    for file in split.archive_files:
        st = os.stat(file)
        sha.update(f"{file.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    for rel, label in zip(split.tree.files, split.tree.labels):
        sha.update(f"{rel}\t{split.tree.classes[label]}\n".encode())
    return sha.hexdigest()


def cache_key(model: FeatureModel, splits: dict[str, Split], fmt: str) -> str:
    parts = {"version": CACHE_VERSION, "model": model.identity(),
             "data": {name: data_identity(split, fmt) for name, split in sorted(splits.items())}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def image_transform(p: Preprocess):
    """Resize the shorter side, centre crop, [0, 1], normalise: the linear evaluation's only processing."""
    from torchvision.transforms import InterpolationMode, v2

    mode = InterpolationMode.BICUBIC if p.interpolation == "bicubic" else InterpolationMode.BILINEAR
    return v2.Compose([v2.ToImage(), v2.Resize(p.resize, interpolation=mode, antialias=True), v2.CenterCrop(p.crop),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(p.mean), std=list(p.std))])


class ImageList(torch.utils.data.Dataset):
    """The split's images, prepared, in the tree's order."""

    def __init__(self, source: ImageSource, files: list[str], transform) -> None:
        self.source, self.files, self.transform = source, files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from simmatch.data.torch_backend import load_image

        return self.transform(load_image(self.source, self.files[i]))


def split_batches(split: Split, preprocess: Preprocess, device: torch.device, batch_size: int,
                  workers: int) -> Iterator[dict[str, torch.Tensor]]:
    from simmatch.data.torch_backend import ignore_time_limit_signal, reraise_worker_error

    loader = torch.utils.data.DataLoader(ImageList(split.source, split.tree.files, image_transform(preprocess)),
                                         batch_size=batch_size, shuffle=False, num_workers=workers,
                                         worker_init_fn=ignore_time_limit_signal)
    it = iter(loader)
    while True:
        try:
            x = next(it)
        except StopIteration:
            return
        except Exception as exc:
            reraise_worker_error(exc)
        yield {"x": x.to(device), "y": torch.zeros(len(x), dtype=torch.long)}


def extract_features(model: FeatureModel, splits: dict[str, Split], device: torch.device, batch_size: int = 256,
                     workers: int = 2) -> dict[str, torch.Tensor]:
    """Each split's L2-normalised pooled features (representation.embed, as the linear probe of
    tools/eval.py takes them), float32 on the CPU, in the tree's order."""
    net = model.net.to(device)
    return {name: embed(net, split_batches(split, model.preprocess, device, batch_size, workers))[0].cpu()
            for name, split in splits.items()}


def read_cache(path: Path, key: str, splits: dict[str, Split]) -> dict[str, torch.Tensor] | None:
    """The cached features when the file is whole and matches the key and the splits' sizes, else None."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception:  # damaged or of another version: computed again and replaced
        return None
    feats = saved.get("features", {}) if isinstance(saved, dict) else {}
    if saved.get("key") != key or set(feats) != set(splits) or \
            any(len(feats[n]) != len(s.tree) for n, s in splits.items()):
        return None
    return feats


def cached_features(model: FeatureModel, splits: dict[str, Split], fmt: str, cache_dir: Path,
                    device: torch.device, batch_size: int = 256,
                    workers: int = 2) -> tuple[dict[str, torch.Tensor], Path, bool]:
    """(features, cache file, read from the cache?): one pass of the network at most per key."""
    path = cache_dir / f"{cache_key(model, splits, fmt)}.pt"
    feats = read_cache(path, path.stem, splits)
    if feats is not None:
        return feats, path, True
    feats = extract_features(model, splits, device, batch_size, workers)
    saved = {"version": CACHE_VERSION, "key": path.stem, "features": feats, "model": model.identity(),
             "files": {n: list(s.tree.files) for n, s in splits.items()}}
    try:
        write_atomic(path, lambda f: torch.save(saved, f))
    except OSError as exc:
        raise UserError(f"cannot write the feature cache {path}: {exc.strerror or exc}; "
                        f"name a writable folder with --cache DIR") from None
    return feats, path, False


def run_transfer(weights: str | Path, data_tree: str | Path, fmt: str = "folder", metric: str = "top1",
                 grid: list[float] | None = None, val_fraction: float = 0.2, seed: int = 0,
                 cache_dir: str | Path | None = None, device: str | None = None, batch_size: int = 256,
                 workers: int = 2, which: str = "teacher", which_ckpt: str = "last", overrides=None,
                 steps: int = 300) -> dict:
    """WEIGHTS' frozen features of DATA_TREE, the L2 weight chosen on the validation split (given
    as val/ beside test/, else a stratified, seeded `val_fraction` of train), the refit on train +
    validation, and the test accuracy; a dict of everything tools/transfer.py prints."""
    import time

    from simmatch.engine.linear_eval import l2_grid, linear_eval, stratified_split
    from simmatch.engine.transfer_weights import load_feature_model

    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), not {val_fraction}")
    splits = find_splits(data_tree, fmt)  # the data first: a wrong path is named before weights load
    classes = list(splits["train"].tree.classes)
    labels = {name: torch.tensor(labels_of(split, classes), dtype=torch.long) for name, split in splits.items()}
    model = load_feature_model(weights, which, which_ckpt, overrides)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cache = Path(cache_dir) if cache_dir else Path(data_tree) / ".features"
    start = time.perf_counter()
    feats, cache_file, hit = cached_features(model, splits, fmt, cache, dev, batch_size, workers)
    feature_s = time.perf_counter() - start
    if "val" in splits:
        train_x, train_y, val_x, val_y = feats["train"], labels["train"], feats["val"], labels["val"]
        validation = f"the given validation split {splits['val'].where}"
    else:
        tr, va = stratified_split(labels["train"], val_fraction, seed)
        if len(va) == 0:
            raise DataError(f"{splits['train'].where}: too few images per class to carve a validation split")
        train_x, train_y = feats["train"][tr], labels["train"][tr]
        val_x, val_y = feats["train"][va], labels["train"][va]
        validation = f"{val_fraction:.0%} of each training class, drawn with seed {seed}"
    start = time.perf_counter()
    res = linear_eval(train_x.to(dev), train_y.to(dev), val_x.to(dev), val_y.to(dev), feats["test"].to(dev),
                      labels["test"].to(dev), len(classes), grid or l2_grid(), metric, steps)
    counts = torch.bincount(labels["test"], minlength=len(classes)).tolist()
    return {"metric": metric, "accuracy": res.accuracy, "l2": res.l2,
            "val_accuracy": res.val_accuracy.get(res.l2), "val_grid": [[k, v] for k, v in res.val_accuracy.items()],
            "n_train": res.n_train, "n_val": res.n_val, "n_test": res.n_test, "classes": len(classes),
            "per_class": {c: {"accuracy": a, "images": n} for c, a, n in zip(classes, res.per_class, counts)},
            "test_split": splits["test"].where, "train_split": splits["train"].where, "validation": validation,
            "cache": str(cache_file), "cache_hit": hit, "feature_s": round(feature_s, 3),
            "fit_s": round(time.perf_counter() - start, 3), "weights": str(model.file), "weights_kind": model.kind,
            "arch": model.arch, "small_input": model.small_input, "which": model.which,
            "preprocess": model.preprocess.text(), "device": str(dev)}
