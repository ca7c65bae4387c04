#!/usr/bin/env python
"""Check a data set tree: decode every image (one thread per core, a progress line on stderr),
name every bad file, per-class counts, and a summary line with the time it took.

A folder torchvision downloaded CIFAR-10, CIFAR-100, SVHN or STL-10 into (data.format cifar10 ...)
is read split by split as training reads it: a missing, truncated or foreign file is named.

A shard set (the OUT of tools/make_shards.py) is checked against its indexes instead: each
index against its digest, every shard's size, tar headers and sha256 (an altered shard's
changed images are named), every index line against the tar member at its offset (path, size,
class), then a seeded sample of images per class decoded (--per-class N), or every image with
--full. An image is named as `PATH (in shard SHARD at offset N)`.

Exit status 0 when every file is a readable image, 1 when problems were found, 2 on usage
errors (missing directory).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from simmatch.archives.check import archive_kind, check_archive  # noqa: E402
from simmatch.errors import cli_errors  # noqa: E402
from simmatch.files.atomic import atomic_write_text  # noqa: E402
from simmatch.images.check import check_tree  # noqa: E402
from simmatch.run.dropped import drop_file_text  # noqa: E402
from simmatch.shards.check import check_shard_set, is_shard_set  # noqa: E402


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dir", help="data set root (train/<class>/..., val/<class>/...) or a split")
    parser.add_argument("--workers", type=int, default=0, help="decoding threads (default: one per core)")
    parser.add_argument("--quiet", action="store_true", help="no per-class table and no progress line")
    parser.add_argument("--per-class", type=int, default=1, help="shard set: images decoded per class")
    parser.add_argument("--full", action="store_true", help="shard set: decode every image")
    parser.add_argument("--write-bad", metavar="FILE",
                        help="write the training images that do not decode into FILE, in the form "
                             "tools/train.py --drop-images FILE takes (other problems as comments)")
    args = parser.parse_args(argv)
    workers = args.workers or os.cpu_count() or 1
    if is_shard_set(args.dir):
        return check_shards(args, workers)
    if archive_kind(args.dir):
        return check_archives(args)
    report = check_tree(args.dir, workers=workers, show_progress=not args.quiet)
    for parent, classes in report.groups().items():
        counts = list(classes.values())
        print(f"{report.root / parent if parent else report.root}: {len(classes)} classes, "
              f"{sum(counts)} images ({min(counts)}-{max(counts)} per class)")
        if not args.quiet:
            width = max(len(c) for c in classes)
            for cls, n in classes.items():
                print(f"  {cls:<{width}}  {n}")
    if report.ignored:
        print(f"ignored {len(report.ignored)} files directly under {report.root}")
    rate = report.decoded / report.seconds if report.seconds > 0 else 0.0
    summary = (f"decoded {report.decoded:,} images in {report.seconds:.1f} s ({rate:,.0f} images/s, "
               f"{workers} threads)")
    problems = [(report.root / rel, reason) for rel, reason in report.problems]
    if args.write_bad:
        split_of = "val/" if {"train", "val"} <= set(report.groups()) else None  # a data root, not a split
        images = [(os.path.abspath(report.root / rel), reason) for rel, reason in report.problems
                  if reason.startswith("cannot decode") and not (split_of and rel.startswith(split_of))]
        write_bad(args, images, [(str(w), r) for w, r in problems if (os.path.abspath(w), r) not in images])
    return conclude(summary, problems)


def write_bad(args: argparse.Namespace, images: list[tuple[str, str]], others: list[tuple[str, str]]) -> None:
    atomic_write_text(Path(args.write_bad), drop_file_text(images, others, args.dir))
    print(f"wrote {len(images)} bad training image(s) to {args.write_bad} (tools/train.py --drop-images "
          f"{args.write_bad} goes on without them)")


def conclude(summary: str, problems: list) -> int:
    """Every problem on its own line, then the summary line with their count; exit status 1 if any."""
    if problems:
        print(f"{len(problems)} problems:")
        for where, reason in problems:
            print(f"  {where}: {reason}")
        print(f"{summary}: {len(problems)} problems")
        return 1
    print(f"{summary}: no problems")
    return 0


def check_archives(args: argparse.Namespace) -> int:
    report = check_archive(args.dir)
    for split, s in report.splits.items():
        counts = list(s["per_class"].values())
        spread = f" ({min(counts)}-{max(counts)} per class)" if counts else " (no labels)"
        print(f"{report.root} {report.name} {split}: {s['images']:,} images of {s['size']} px, "
              f"{s['classes']} classes{spread}")
        if not args.quiet and counts:
            width = max(len(c) for c in s["per_class"])
            for cls, n in s["per_class"].items():
                print(f"  {cls:<{width}}  {n}")
    images = sum(s["images"] for s in report.splits.values())
    return conclude(f"read {images:,} images of {report.name} in {report.seconds:.1f} s", report.problems)


def check_shards(args: argparse.Namespace, workers: int) -> int:
    report = check_shard_set(args.dir, workers, per_class=args.per_class, full=args.full,
                             show_progress=not args.quiet)
    for split, s in report.splits.items():
        print(f"{report.root / split}: {s['classes']} classes, {s['images']:,} images in {s['shards']} shards "
              f"({s['bytes'] / 1e6:,.1f} MB)")
    what = "every image" if args.full else f"{args.per_class} per class"
    summary = (f"checked {report.bytes_read / 1e6:,.1f} MB of shards (sha256, index lines) and decoded "
               f"{report.decoded:,} images ({what}) in {report.seconds:.1f} s")
    if args.write_bad:
        train = f"{os.sep}train{os.sep}"
        images = [(w, r) for w, r in report.problems if " (in shard " in w and train in w.split(" (in shard ")[1]]
        write_bad(args, images, [p for p in report.problems if p not in images])
    return conclude(summary, report.problems)


if __name__ == "__main__":
    from simmatch.launch.process import run_cli

    run_cli(main)
