#!/usr/bin/env python
"""Pack an ImageNet-style tree (SRC/train/<class>/*, SRC/val/<class>/*) into indexed tar shards.

Every image is decoded first (one thread per job, a progress line on stderr): one that does not
decode stops the build before anything is packed (exit 2, the first few named), unless
--skip-bad leaves such images out (listed in OUT/skipped.txt: split, path, reason). --no-check
skips the decode pass for a tree that tools/check_data.py has already checked.

Writes OUT/train/NNNNNN.tar, OUT/val/NNNNNN.tar (the webdataset layout: KEY.jpg + KEY.cls) and
OUT/train.index, OUT/val.index (each image's shard, offset, size, class, CRC-32 and original
path; each shard's sha256), each with its digest OUT/<split>.index.sha256. A killed build
continues where it stopped when started again with the same arguments; a shard is renamed to
its final name only once whole. Train from it with data.format=shards data.shards=OUT.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from simmatch.errors import cli_errors  # noqa: E402
from simmatch.shards.build import make_shards, parse_size  # noqa: E402


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("src", help="data set root holding train/ and val/")
    parser.add_argument("out", help="output folder for the shards and their indexes")
    parser.add_argument("--shard-size", default="1GB",
                        help="largest shard (default 1GB = 10^9 bytes; also MiB, KB ...)")
    parser.add_argument("--jobs", type=int, default=0, help="shards written at once (default: one per core)")
    parser.add_argument("--no-check", action="store_true",
                        help="do not decode every image first (a tree already checked by tools/check_data.py)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave out the images that do not decode (listed in OUT/skipped.txt) instead of stopping")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    jobs = args.jobs or os.cpu_count() or 1
    summary = make_shards(args.src, args.out, parse_size(args.shard_size), jobs, show_progress=not args.quiet,
                          check=not args.no_check, skip_bad=args.skip_bad)
    if summary.get("complete"):
        return 0
    seconds = time.perf_counter() - started
    images = sum(s["images"] for s in summary.values())
    for split, s in summary.items():
        left_out = f" ({s['skipped']:,} left out: they do not decode)" if s["skipped"] else ""
        print(f"{split}: {s['images']:,} images in {s['shards']} shards, {s['bytes'] / 1e6:,.1f} MB{left_out}")
    print(f"packed {images:,} images into {args.out} in {seconds:.1f} s ({images / max(seconds, 1e-9):,.0f} "
          f"images/s, {jobs} job{'' if jobs == 1 else 's'})")
    return 0


if __name__ == "__main__":
    from simmatch.launch.process import run_cli

    run_cli(main)
