"""Image files: a folder tree as lists of paths (tree.py), the source of their bytes (source.py), whether
they decode (decode.py) and tools/check_data.py's check of a tree (check.py). Below the shard sets and
the data streams; no torch."""
