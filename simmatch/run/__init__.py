"""The run directory and everything judged about it before training: its layout (`rundir`),
the one-writer lock (`lock`), whether a changed config may resume it (`change`), the pre-flight
checks (`preflight`), the recipe a config trains (`recipe`), the world sizes it has had
(`world_sizes`) and its JSON-lines logs (`jsonl`). No torch at import: the submitting machine
and `tools/status.py` use it."""
