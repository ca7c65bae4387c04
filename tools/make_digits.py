#!/usr/bin/env python
"""Write scikit-learn's digits as a JPEG tree (train/<class>, val/<class>) for demos and tests, or
(--format cifar10) as a CIFAR-10 archive in torchvision's format: OUT/cifar-10-batches-py/."""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from simmatch.data.digits import write_digits, write_digits_cifar10  # noqa: E402
from simmatch.errors import cli_errors  # noqa: E402


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--size", type=int, default=32, help="side of the written images in px")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    parser.add_argument("--format", choices=("folder", "cifar10"), default="folder",
                        help="a JPEG tree, or a CIFAR-10 archive of 32 px images (--size ignored)")
    args = parser.parse_args(argv)
    if args.format == "cifar10":
        counts = write_digits_cifar10(args.out, seed=args.seed)
    else:
        counts = write_digits(args.out, size=args.size, seed=args.seed)
    print(f"wrote {counts['train']} train and {counts['val']} val images to {args.out}")
    return 0


if __name__ == "__main__":
    from simmatch.launch.process import run_cli

    run_cli(main)
