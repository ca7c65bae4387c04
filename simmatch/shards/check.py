"""Check a shard set the way tools/check_data.py checks a tree: every shard against its index.

Per split: the index is read (and checked against its digest), each shard's size and tar
headers checked against it, every shard's sha256 computed (all bytes read: altered ones are
caught and their images named by their CRC-32) and every index line compared with the tar
member at its offset, then images decoded: a seeded sample of `per_class` per class, or all of
them. Images are named by `ShardSource.where`: path, shard and byte offset.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from simmatch.errors import DataError
from simmatch.images.decode import Progress, decode_all
from simmatch.shards.index import SPLITS, index_path, read_index
from simmatch.shards.source import ShardSource
from simmatch.shards.verify import ByteProgress, check_layout, digest_problems


@dataclass
class ShardReport:
    root: Path
    splits: dict[str, dict] = field(default_factory=dict)  # split -> classes, images, shards, bytes
    problems: list[tuple[str, str]] = field(default_factory=list)  # (shard or image, reason)
    decoded: int = 0
    bytes_read: int = 0
    seconds: float = 0.0


def is_shard_set(path: str | Path) -> bool:
    return index_path(path, "train").is_file()


def check_shard_set(root: str | Path, workers: int, per_class: int = 1, full: bool = False,
                    show_progress: bool = False) -> ShardReport:
    root = Path(root)
    report = ShardReport(root)
    started = time.perf_counter()
    for split in SPLITS:
        if not index_path(root, split).is_file():
            if split == "train":
                raise DataError(f"shard index not found: {index_path(root, split)}")
            continue
        index = read_index(root, split)
        report.splits[split] = {"classes": len(index.classes), "images": len(index),
                                "shards": len(index.shards), "bytes": sum(s.bytes for s in index.shards)}
        try:
            check_layout(index)
        except DataError as exc:
            report.problems.append((str(index.path), str(exc)))
        total = report.splits[split]["bytes"]
        progress = ByteProgress(total, "sha256") if show_progress else None
        report.problems += digest_problems(index, progress.step if progress else None)
        report.bytes_read += total
        source = ShardSource(index, 64)
        if full:
            chosen = list(index.paths)
        else:
            rng = random.Random(0)
            by_class: dict[int, list[str]] = {}
            for rel, label in zip(index.paths, index.label.tolist()):
                by_class.setdefault(label, []).append(rel)
            chosen = [rel for c in sorted(by_class)
                      for rel in rng.sample(by_class[c], min(per_class, len(by_class[c])))]
        decoding = Progress(len(chosen)) if show_progress else None
        for rel, reason in decode_all(source, chosen, workers, progress=decoding):
            report.problems.append((source.where(rel), f"cannot decode: {reason}"))
        report.decoded += len(chosen)
    report.seconds = time.perf_counter() - started
    return report
