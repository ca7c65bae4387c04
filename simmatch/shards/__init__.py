"""Indexed tar shards: the data set packed into a few large files, read by offset in the run's own order.

`build` packs a tree (tools/make_shards.py), `index` reads and writes the per-split index,
`reader` reads images by (shard, offset, size), `verify` checks shards against their index.
The streams reach them through `simmatch.shards.source.ShardSource`, chosen by data.format in `formats.py`.
"""
