"""Which files exist, which are labeled, which are unlabeled: the data set as lists of paths.

Paths are POSIX, relative to the split's directory (`<class>/<file>`), so a list written on
one machine works on another. Every choice is deterministic: files are sorted, generated
splits are seeded, and a list file keeps its own order (its line number is the bank slot).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simmatch.errors import ConfigError, DataError
from simmatch.images.source import FolderSource, ImageSource
from simmatch.images.tree import ImageTree, scan_tree
from simmatch.run.dropped import read_dropped
from simmatch.run.rundir import read_run_list, split_list
from simmatch.shards.formats import data_format

# `shipped:<name>` in data.labeled_list / data.unlabeled_list names a list in this folder.
SHIPPED_PREFIX = "shipped:"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "splits"

def list_path(name: str | Path) -> Path:
    """The file a config's list entry names: `shipped:<name>` is a list shipped with the
    package (simmatch/splits/<name>, found from any working directory), anything else a path."""
    text = str(name)
    if text.startswith(SHIPPED_PREFIX):
        rel = text[len(SHIPPED_PREFIX):].lstrip("/")
        path = SHIPPED_DIR / rel
        if not path.is_file():
            shipped = sorted(str(p.relative_to(SHIPPED_DIR)) for p in SHIPPED_DIR.rglob("*.txt"))
            raise DataError(f"{text}: no such shipped list (shipped: {', '.join(shipped)})")
        return path
    return Path(text)


def read_list(path: str | Path) -> list[str]:
    """The entries of a list file given in a config (`data.labeled_list`, `data.unlabeled_list`):
    every line that is not empty and not a `#` comment, as written (see `entry_forms` for how an
    entry names a file)."""
    path = list_path(path)
    if not path.is_file():
        raise DataError(f"split file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"split file {path} is not UTF-8 text") from None
    entries = [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]
    entries = [ln for ln in entries if ln.strip() and not ln.lstrip().startswith("#")]
    if not entries:
        raise DataError(f"split file is empty: {path}")
    return entries


def entry_forms(entry: str) -> list[str]:
    """The paths a list entry may mean, most literal first: the line as it is (a name may hold
    spaces, backslashes or leading blanks), then stripped, then its first field with `\\` as `/`
    and no leading `./` (lists of the form `path label`, written on Windows)."""
    token = entry.split()[0].replace("\\", "/") if entry.split() else entry
    token = token[2:] if token.startswith("./") else token
    return list(dict.fromkeys([entry, entry.strip(), token]))


def write_list(paths: list[str], out: str | Path) -> Path:
    """One relative path per line; written to a temporary name first so readers never see half."""
    from simmatch.files.atomic import atomic_write_text

    out = Path(out)
    atomic_write_text(out, "".join(p + "\n" for p in paths))
    return out


def resolve_list(tree: ImageTree, entries: list[str], source: str,
                 allow_outside: bool = False, images: ImageSource | None = None) -> tuple[list[str], list[int]]:
    """Map list entries to files of `tree`: exact relative paths, else bare file names.

    Bare names (the SimCLR 1%/10% lists) are matched by file name and must be unique in the
    tree. Duplicated entries keep their first occurrence. With `allow_outside`, an entry that
    is an image of `images` (by default a file under the root) outside the class folders gets
    label -1.
    """
    images = images or FolderSource(tree.root)
    label_of = dict(zip(tree.files, tree.labels))
    by_name: dict[str, str | None] = {}
    for f in tree.files:
        name = f.rsplit("/", 1)[-1]
        by_name[name] = None if name in by_name else f  # None marks an ambiguous name
    files: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    missing: list[str] = []
    for entry in entries:
        forms = entry_forms(entry)
        rel = next((f for f in forms if f in label_of), None)
        for form in forms if rel is None else ():
            if "/" not in form and form in by_name:  # a bare file name
                rel = by_name[form]
                if rel is None:
                    raise DataError(f"{source}: '{form}' matches several files in {tree.root}")
                break
        if rel is not None:
            label = label_of[rel]
        elif allow_outside and (rel := next((f for f in forms if images.has(f)), None)):
            label = -1
        else:
            missing.append(entry)
            continue
        if rel not in seen:
            seen.add(rel)
            files.append(rel)
            labels.append(label)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataError(f"{source}: {len(missing)} entries not found under {tree.root}: {shown}")
    return files, labels


def sample_split(tree: ImageTree, percent: float = 0.0, per_class: int = 0,
                 seed: int = 0) -> list[str]:
    """A seeded, class-stratified labeled subset, sorted by path.

    `percent`: round(P% of each class), at least one image per class; `per_class`: exactly N
    per class (a class with fewer images is an error). One generator for all classes, drawn
    in class order, so the split depends only on the file list and the seed.
    """
    if percent <= 0 and per_class <= 0:
        raise ConfigError("no labeled split: set data.labeled_list, data.labeled_percent "
                          "or data.labeled_per_class")
    if percent > 100:
        raise ConfigError(f"data.labeled_percent={percent} must be at most 100")
    rng = np.random.default_rng(seed)
    labels = np.asarray(tree.labels)
    chosen: list[str] = []
    for c, cls in enumerate(tree.classes):
        members = np.flatnonzero(labels == c)
        if percent > 0:
            n = max(1, int(math.floor(len(members) * percent / 100.0 + 0.5)))
        else:
            n = per_class
            if len(members) < n:
                raise DataError(f"class '{cls}' in {tree.root} has {len(members)} images, "
                                f"fewer than {n} per class")
        picked = members[rng.permutation(len(members))[:n]]
        chosen += [tree.files[i] for i in picked]
    return sorted(chosen)


@dataclass
class Splits:
    """Everything the streams read: labeled (bank order), unlabeled and val files with labels."""

    classes: list[str]
    train_root: Path
    val_root: Path
    labeled_files: list[str]
    labeled_labels: list[int]
    unlabeled_files: list[str]
    unlabeled_labels: list[int]
    val_files: list[str]
    val_labels: list[int]
    labeled_source: str  # the list file used, or a description of the generated split
    train_source: ImageSource | None = None  # where the bytes are read (data.format); a folder by default
    val_source: ImageSource | None = None

    def __post_init__(self) -> None:
        self.train_source = self.train_source or FolderSource(self.train_root)
        self.val_source = self.val_source or FolderSource(self.val_root)


def _resolve_frozen(tree: ImageTree, path: Path, name: str, allow_outside: bool, images: ImageSource,
                    dropped: frozenset[str] = frozenset()) -> tuple[list[str], list[int]]:
    """Files and labels of a run's own split list; every file must still exist, but those the run
    dropped (--drop-images: their places are taken by others, `substitute_dropped`). An unlabeled
    image outside the class folders (`images` has it) has label -1."""
    label_of = dict(zip(tree.files, tree.labels))
    files, labels, missing = [], [], []
    for rel in read_run_list(path):  # exactly as the run wrote it
        if rel in label_of:
            files.append(rel)
            labels.append(label_of[rel])
        elif rel in dropped or allow_outside and images.has(rel):
            files.append(rel)
            labels.append(-1)
        else:
            missing.append(rel)
    if missing:
        shown = ", ".join(str(tree.root / m) for m in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DataError(f"{len(missing)} {name} files of this run's split ({path}) are missing: "
                        f"{shown}{more}; a resumed run keeps the split it started with, so "
                        f"restore them, or go on without them: list them in a file and start again "
                        f"with --drop-images FILE (unlabeled images only)")
    return files, labels


def substitute_dropped(files: list[str], labels: list[int], dropped: frozenset[str]) -> tuple[list[str], list[int]]:
    """The unlabeled list with each dropped image's place taken by the next image of the list
    that is not dropped (cyclically): the same length, so the run's data positions stay valid."""
    n = len(files)
    if not any(f not in dropped for f in files):
        raise DataError("every unlabeled image of this run is dropped (splits/dropped.txt)")
    out_files, out_labels = list(files), list(labels)
    for i, rel in enumerate(files):
        if rel in dropped:
            j = (i + 1) % n
            while files[j] in dropped:
                j = (j + 1) % n
            out_files[i], out_labels[i] = files[j], labels[j]
    return out_files, out_labels


def load_splits(data_cfg, need_val: bool = True, frozen: str | Path | None = None) -> Splits:
    """Scan the train (and val) trees and resolve the labeled and unlabeled lists of `data_cfg`.

    `frozen`: the `splits/` folder of a run being resumed. Its `labeled.txt` and
    `unlabeled.txt` (when present) replace the config's lists, so a resumed run trains on
    exactly the files it started with: a missing one is an error, a new one is ignored with
    a warning.
    """
    fmt = data_format(data_cfg)
    train, train_source = fmt.split("train")
    frozen = Path(frozen) if frozen is not None else None
    frozen_lab = split_list(frozen, "labeled") if frozen is not None else None
    frozen_unl = split_list(frozen, "unlabeled") if frozen is not None else None
    dropped = frozenset(read_dropped(frozen)) if frozen is not None else frozenset()
    if frozen_lab is not None and frozen_lab.is_file():
        lab_files, lab_labels = _resolve_frozen(train, frozen_lab, "labeled", False, train_source)
        source = str(frozen_lab)
    elif data_cfg.labeled_list:
        lpath = list_path(data_cfg.labeled_list)
        lab_files, lab_labels = resolve_list(train, read_list(lpath), str(lpath))
        source = str(lpath)
    else:
        lab_files = sample_split(train, data_cfg.labeled_percent, data_cfg.labeled_per_class,
                                 data_cfg.split_seed)
        label_of = dict(zip(train.files, train.labels))
        lab_labels = [label_of[f] for f in lab_files]
        how = (f"{data_cfg.labeled_percent:g}%" if data_cfg.labeled_percent > 0
               else f"{data_cfg.labeled_per_class} per class")
        source = f"generated: {how}, split_seed={data_cfg.split_seed}"
    if frozen_unl is not None and frozen_unl.is_file():
        unl_files, unl_labels = _resolve_frozen(train, frozen_unl, "unlabeled", True, train_source, dropped)
        if not data_cfg.unlabeled_list:  # the unlabeled set was the data set's whole pool
            new = len(set(fmt.unlabeled_pool(train)[0]) - set(unl_files) - set(lab_files))
            if new:
                logging.getLogger("simmatch").warning(
                    "warning: %d images under %s are not in this run's split (%s) and are "
                    "ignored: a resumed run keeps the split it started with", new, train.root, frozen)
    elif data_cfg.unlabeled_list:
        upath = list_path(data_cfg.unlabeled_list)
        unl_files, unl_labels = resolve_list(train, read_list(upath), str(upath), True, train_source)
    else:
        unl_files, unl_labels = fmt.unlabeled_pool(train)
    if data_cfg.unlabeled == "complement":
        unl_files, unl_labels = complement(unl_files, unl_labels, lab_files)
    if dropped:
        unl_files, unl_labels = substitute_dropped(unl_files, unl_labels, dropped)
    val_files: list[str] = []
    val_labels: list[int] = []
    val_root = fmt.split_dir("val")
    val_source = None
    if need_val:
        val, val_source = fmt.split("val")
        if val.classes != train.classes:
            raise DataError(f"class folders of {val.root} differ from those of {train.root}")
        val_files, val_labels, val_root = val.files, val.labels, val.root
    return Splits(train.classes, train.root, val_root, lab_files, lab_labels, unl_files,
                  unl_labels, val_files, val_labels, source, train_source, val_source)


def complement(files: list[str], labels: list[int], labeled: list[str]) -> tuple[list[str], list[int]]:
    """The entries of `files` (order kept) that are not in `labeled`: data.unlabeled=complement."""
    taken = set(labeled)
    keep = [i for i, f in enumerate(files) if f not in taken]
    if not keep:
        raise DataError("data.unlabeled=complement leaves no unlabeled image: every image is labeled")
    return [files[i] for i in keep], [labels[i] for i in keep]


def make_labeled_list(train_root: str | Path, percent: float = 0.0, per_class: int = 0,
                      from_list: str | Path | None = None, seed: int = 0,
                      num_classes: int | None = None) -> list[str]:
    """The labeled list behind tools/make_split.py: converted from `from_list` (relative paths
    or bare file names, order kept) or sampled by `percent` / `per_class` with `seed`."""
    tree = scan_tree(train_root, num_classes)
    if from_list:
        return resolve_list(tree, read_list(from_list), str(from_list))[0]
    return sample_split(tree, percent, per_class, seed)
