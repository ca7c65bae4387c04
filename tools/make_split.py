#!/usr/bin/env python
"""Write a labeled list (one path relative to the train folder per line) for data.labeled_list.

Sample a seeded, class-stratified split (--percent P or --per-class N), or convert an
existing list (--convert FILE, e.g. SimCLR's 1%/10% lists of bare file names).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from simmatch.data.splits import make_labeled_list, write_list  # noqa: E402
from simmatch.errors import cli_errors  # noqa: E402


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="data set root (holds the train folder)")
    parser.add_argument("--train-dir", default="train", help="train folder under --data")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--percent", type=float, help="percent of each class (at least one image)")
    how.add_argument("--per-class", type=int, help="images per class")
    how.add_argument("--convert", help="existing list of relative paths or bare file names")
    parser.add_argument("--seed", type=int, default=0, help="seed of a sampled split")
    parser.add_argument("--num-classes", type=int, default=None, help="expected class count")
    parser.add_argument("--out", required=True, help="list file to write")
    args = parser.parse_args(argv)
    train_root = Path(args.data) / args.train_dir
    paths = make_labeled_list(train_root, percent=args.percent or 0.0, per_class=args.per_class or 0,
                              from_list=args.convert, seed=args.seed, num_classes=args.num_classes)
    write_list(paths, args.out)
    per_class = Counter(p.split("/", 1)[0] for p in paths)
    print(f"wrote {len(paths)} images of {len(per_class)} classes to {args.out} "
          f"({min(per_class.values())}-{max(per_class.values())} per class)")
    return 0


if __name__ == "__main__":
    from simmatch.launch.process import run_cli

    run_cli(main)
