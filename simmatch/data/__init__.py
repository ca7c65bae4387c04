"""Data streams of a SimMatch run: labeled (bank-indexed), unlabeled (weak + strong), val.

`build_streams(cfg, scale, ranks, process, device)` is the entry point (the engine decides the
scale and the ranks); splits are made and read
by the functions of `simmatch.data.splits` (also behind tools/make_split.py).
"""
from simmatch.data.splits import (
    Splits,
    load_splits,
    read_list,
    resolve_list,
    sample_split,
    write_list,
)

_STREAMS = ("Streams", "build_streams", "resolve_device", "val_batch")


def __getattr__(name: str):
    """The stream names import torch: only when asked for, so that list handling (the recipe
    printed by tools/submit.py --dry-run) stays free of torch."""
    if name in _STREAMS:
        from simmatch.data import streams

        return getattr(streams, name)
    raise AttributeError(f"module 'simmatch.data' has no attribute {name!r}")


__all__ = ["Splits", "Streams", "build_streams", "load_splits", "read_list", "resolve_device", "resolve_list",
           "sample_split", "val_batch", "write_list"]
