"""Where a data set's images are, by `data.format`: the one place the choice is made.

`folder`: the tree under `data.root` (`train_dir`, `val_dir`); `shards`: the tar shards and
indexes that tools/make_shards.py packed into `data.shards`; `cifar10`, `cifar100`, `svhn`,
`stl10`: the archives torchvision downloads, read by simmatch/archives/. Everything else asks the format
object `data_format(data_cfg)` returns (where the data is, its splits, their class count) and
the image source it gives (simmatch/images/source.py), never `data.format` itself. No torch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from simmatch.errors import ConfigError, DataError
from simmatch.images.source import FolderSource, ImageSource
from simmatch.images.tree import ImageTree, scan_tree
from simmatch.shards.index import SPLITS, index_path, read_index
from simmatch.shards.source import ShardSource


class Folder:
    """An ImageNet-style tree: `root/train_dir/<class>/<image>` and `root/val_dir/...`."""

    key = "data.root"

    def __init__(self, data_cfg: Any) -> None:
        self.cfg = data_cfg
        self.path = Path(data_cfg.root) if data_cfg.root else None

    def root(self) -> Path:
        """The data set's folder, which must be set and exist."""
        if self.path is None:
            raise ConfigError("data.root is empty: set it to the data set directory")
        if not self.path.is_dir():
            raise DataError(f"data directory not found: {self.path}")
        return self.path

    def split_dir(self, split: str) -> Path:
        """The folder of a split's images, named by the split lists' paths."""
        return (self.path or Path()) / (self.cfg.train_dir if split == "train" else self.cfg.val_dir)

    def listing(self) -> Path:
        """What lists the training images (for a recipe printed where the data may be absent)."""
        return self.split_dir("train")

    def listing_name(self) -> str:
        return f"data tree {self.listing()}"

    def check_config(self) -> None:
        """Relations between keys, before any file is read (config validation)."""

    full_check_name = None  # `--check --full` reads nothing beyond decoding every image

    def full_check(self, splits: Any) -> str:
        raise NotImplementedError

    def require(self) -> None:
        root = self.root()
        for sub in (self.cfg.train_dir, self.cfg.val_dir):
            if not (root / sub).is_dir():
                raise DataError(f"data directory not found: {root / sub}")

    def split(self, split: str) -> tuple[ImageTree, ImageSource]:
        self.root()
        tree = scan_tree(self.split_dir(split), self.cfg.num_classes or None)
        return tree, FolderSource(tree.root)

    def unlabeled_pool(self, tree: ImageTree) -> tuple[list[str], list[int]]:
        """The unlabeled set when no list names it: every training image."""
        return list(tree.files), list(tree.labels)

    pool_text = "every training image"

    def declared_sizes(self) -> tuple[int, int] | None:
        """(training images, unlabeled pool) known without the data; None: unknown (data.num_train_images)."""
        return None

    def count_classes(self) -> int:
        try:
            with os.scandir(self.listing()) as entries:
                return sum(1 for e in entries if e.is_dir() and not e.name.startswith("."))
        except OSError:
            return 0


class Shards:
    """The shard set tools/make_shards.py wrote: `shards/<split>/NNNNNN.tar` and `shards/<split>.index`."""

    key = "data.shards"

    def __init__(self, data_cfg: Any) -> None:
        self.cfg = data_cfg
        self.path = Path(data_cfg.shards) if data_cfg.shards else None

    def root(self) -> Path:
        if self.path is None:
            raise ConfigError("data.format=shards needs data.shards: the folder tools/make_shards.py wrote")
        if not self.path.is_dir():
            raise DataError(f"shard folder not found: {self.path}")
        return self.path

    def split_dir(self, split: str) -> Path:
        return (self.path or Path()) / split

    def listing(self) -> Path:
        return index_path(self.path or Path(), "train")

    def listing_name(self) -> str:
        return f"shard index {self.listing()}"

    def check_config(self) -> None:
        if self.path is None:
            raise ConfigError("data.format=shards needs data.shards: the folder tools/make_shards.py wrote")

    full_check_name = "shards against their indexes (sha256, index lines)"

    def full_check(self, splits: Any) -> str:
        """Every byte of every shard against its index's sha256 (altered images named), and every
        index line against the tar member at its offset (verify.digest_problems)."""
        import time

        from simmatch.shards.verify import digest_problems

        started, total, shards = time.perf_counter(), 0, 0
        for source in (splits.train_source, splits.val_source):
            index = source.index
            for shard, reason in digest_problems(index)[:1]:
                raise DataError(f"{shard}: {reason}; restore it or pack the data set again (tools/make_shards.py)")
            total += sum(s.bytes for s in index.shards)
            shards += len(index.shards)
        return (f"{shards} shards, {total / 1e9:,.2f} GB: every sha256 and every index line matches its shard "
                f"({time.perf_counter() - started:.1f} s)")

    def require(self) -> None:
        root = self.root()
        for split in SPLITS:
            if not index_path(root, split).is_file():
                raise DataError(f"shard index not found: {index_path(root, split)} (tools/make_shards.py writes it)")

    def split(self, split: str) -> tuple[ImageTree, ImageSource]:
        """The split's images from its index, checked against its shards first (verify.check_layout)."""
        from simmatch.shards.verify import check_layout

        index = read_index(self.root(), split)
        if self.cfg.num_classes and len(index.classes) != self.cfg.num_classes:
            raise DataError(f"{index.path} has {len(index.classes)} classes but "
                            f"data.num_classes={self.cfg.num_classes}")
        check_layout(index)
        source = ShardSource(index, self.cfg.max_open_shards)
        return ImageTree(source.root, list(index.classes), index.paths, index.label.tolist()), source

    def unlabeled_pool(self, tree: ImageTree) -> tuple[list[str], list[int]]:
        return list(tree.files), list(tree.labels)

    pool_text = "every training image"

    def declared_sizes(self) -> tuple[int, int] | None:
        return None

    def count_classes(self) -> int:
        try:
            with open(self.listing(), encoding="utf-8") as f:
                return len(json.loads(f.readline())["classes"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0


class Archive:
    """A data set as torchvision's class downloads it into `data.root` (data.format cifar10,
    cifar100, svhn, stl10; simmatch/archives/): its training archive for the labeled draw and the
    unlabeled pool (STL-10: its unlabeled archive), its test archive for validation."""

    key = "data.root"
    # (training images, unlabeled pool, classes) as published; SVHN's extra adds EXTRA_SVHN
    SIZES = {"cifar10": (50_000, 50_000, 10), "cifar100": (50_000, 50_000, 100),
             "svhn": (73_257, 73_257, 10), "stl10": (5_000, 100_000, 10)}
    EXTRA_SVHN = 531_131

    def __init__(self, data_cfg: Any) -> None:
        self.cfg = data_cfg
        self.name = data_cfg.format
        self.path = Path(data_cfg.root) if data_cfg.root else None

    def root(self) -> Path:
        if self.path is None:
            raise ConfigError(f"data.root is empty: set it to the folder torchvision's {self.name} archive "
                              f"was downloaded into (docs/DATA.md)")
        if not self.path.is_dir():
            raise DataError(f"data directory not found: {self.path}")
        return self.path

    def split_dir(self, split: str) -> Path:
        from simmatch.archives import ARCHIVE_FOLDER

        return (self.path or Path()) / ARCHIVE_FOLDER[self.name]

    def listing(self) -> Path:
        from simmatch.archives import expected_files

        return expected_files(self.name, self.path or Path(), split="train")[0]

    def listing_name(self) -> str:
        return f"{self.name} archive {self.listing()}"

    def check_config(self) -> None:
        if self.cfg.extra and self.name != "svhn":
            raise ConfigError(f"data.extra=true is for data.format=svhn (its extra_32x32.mat), not {self.name}")
        side = 96 if self.name == "stl10" else 32
        if self.cfg.augment != "translate" or self.cfg.crop_size != side:
            raise ConfigError(f"data.format={self.name} holds {side} px images, trained as they are: set "
                              f"data.augment=translate and data.crop_size={side} (as yaml/table1/ does), not "
                              f"data.augment={self.cfg.augment}, data.crop_size={self.cfg.crop_size}")

    full_check_name = None

    def full_check(self, splits: Any) -> str:
        raise NotImplementedError

    def require(self) -> None:
        from simmatch.archives import require_archive

        require_archive(self.name, self.root(), self.cfg.extra)

    def split(self, split: str) -> tuple[ImageTree, ImageSource]:
        """The split's images (val: the test archive); STL-10's training source also holds its
        unlabeled images (`unlabeled_pool`), outside the tree's classes."""
        from simmatch.archives import read_archive
        from simmatch.images.arrays import ArraySource

        root = self.root()
        arrays = read_archive(self.name, root, "train" if split == "train" else "test", self.cfg.extra)
        where = self.split_dir(split) if self.name != "svhn" else root
        parts = [(arrays.names, arrays.images, f"the {'training' if split == 'train' else 'test'} images in {where}")]
        if split == "train" and self.name == "stl10":
            pool = read_archive(self.name, root, "unlabeled")
            parts.append((pool.names, pool.images, f"the unlabeled images in {where}"))
        if self.cfg.num_classes and len(arrays.classes) != self.cfg.num_classes:
            raise DataError(f"{self.listing_name()} has {len(arrays.classes)} classes but "
                            f"data.num_classes={self.cfg.num_classes}")
        tree = ImageTree(self.split_dir(split), list(arrays.classes), list(arrays.names),
                         [int(v) for v in arrays.labels])
        return tree, ArraySource(tree.root, parts)

    def unlabeled_pool(self, tree: ImageTree) -> tuple[list[str], list[int]]:
        """CIFAR and SVHN: every training image (FixMatch's and USB's reading); STL-10: its
        100,000 unlabeled images (label -1)."""
        if self.name != "stl10":
            return list(tree.files), list(tree.labels)
        from simmatch.archives import read_archive

        names = read_archive(self.name, self.root(), "unlabeled").names
        return list(names), [-1] * len(names)

    @property
    def pool_text(self) -> str:
        return "STL-10's 100,000 unlabeled images" if self.name == "stl10" else "every training image"

    def declared_sizes(self) -> tuple[int, int] | None:
        train, pool, _ = self.SIZES[self.name]
        extra = self.EXTRA_SVHN if self.cfg.extra else 0
        return train + extra, pool + extra

    def count_classes(self) -> int:
        return self.SIZES[self.name][2]


FORMATS = {"folder": Folder, "shards": Shards, "cifar10": Archive, "cifar100": Archive, "svhn": Archive,
           "stl10": Archive}


def data_format(data_cfg: Any) -> Folder | Shards | Archive:
    """The format object of a config's data section (`data.format`)."""
    return FORMATS[data_cfg.format](data_cfg)


def require_data_dirs(data_cfg: Any) -> None:
    """The data's folders or indexes exist (a cheap check, before anything heavy is imported or
    started); the synthetic backend reads none."""
    if data_cfg.backend != "synthetic":
        data_format(data_cfg).require()
