"""Checkpoints: `atomic` (temporary files, digests; no torch), `store` (save, verify, read and
find checkpoints), `saver` (the training's background writer), `elastic` (what a checkpoint of W
ranks becomes on W'; no torch). The run directory's layout is simmatch/run/rundir.py."""
