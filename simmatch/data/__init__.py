"""Data streams of a SimMatch run: labeled (bank-indexed), unlabeled (weak + strong), val.

`build_streams(cfg, rank, world_size, device)` is the entry point; splits are made and read
by the functions of `simmatch.data.splits` (also behind tools/make_split.py).
"""
from simmatch.data.splits import (ImageTree, Splits, load_splits, read_list, resolve_list,
                                  sample_split, scan_tree, write_list)
from simmatch.data.streams import Streams, build_streams, per_rank_batches, resolve_device

__all__ = ["ImageTree", "Splits", "Streams", "build_streams", "load_splits", "per_rank_batches",
           "read_list", "resolve_device", "resolve_list", "sample_split", "scan_tree", "write_list"]
