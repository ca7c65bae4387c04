"""Elastic resume: what a checkpoint written by W ranks becomes on W' ranks.

Exact across world sizes: weights, teacher, bank, optimizer and scaler (replicated on every
rank), and the data position (the epoch's images consumed by all ranks together, see
`sharding.ShardPlan.tail_*`). Re-expressed: the iteration, in steps of the new global batch so
that the schedule (warm-up, cosine, intervals, all per step of the reference batch under
`train.scale=per_gpu`) stays continuous in images seen; the DA queues, whose length is a number
of batch means and so follows the global batch too (`resize_fifo`); the per-rank random streams,
derived afresh from (seed, global rank, world size, iteration).
"""
from __future__ import annotations

import torch

from simmatch.config import Config, derive_scale


def rescale_iteration(iteration: int, old_global_batch: int, new_global_batch: int) -> int:
    """The step, in steps of `new_global_batch`, at which as many images have been seen as after
    `iteration` steps of `old_global_batch` (nearest step; exact whenever it divides)."""
    if old_global_batch == new_global_batch:
        return iteration
    return int(round(iteration * old_global_batch / new_global_batch))


def describe(cfg: Config, old_world: int, new_world: int, iteration: int, total_iters: int | None = None) -> str:
    """One line saying what an elastic resume from `old_world` to `new_world` ranks changes."""
    old, new = derive_scale(cfg, old_world), derive_scale(cfg, new_world)
    it = rescale_iteration(iteration, old.global_batch, new.global_batch)
    of = f" of {total_iters}" if total_iters else ""
    return (f"elastic resume {old_world} -> {new_world} ranks: {old.global_batch} -> {new.global_batch} "
            f"labeled images per step, lr {old.lr:.4g} -> {new.lr:.4g}, iteration {iteration} -> {it}{of}")


def resize_fifo(rows: torch.Tensor, ptr: int, filled: int, new_len: int,
                fill: torch.Tensor | None = None) -> tuple[torch.Tensor, int, int]:
    """A ring buffer of `rows` (next write at `ptr`, `filled` rows written) at another length:
    the newest min(filled, new_len) rows kept in order of age, the free rows zero (or `fill`).

    Returns (rows, ptr, filled) of the new buffer; with `new_len` equal it is the buffer itself.
    """
    old_len = rows.shape[0]
    if new_len == old_len:
        return rows.clone(), ptr, filled
    filled = min(filled, old_len)
    ages = [(ptr - filled + i) % old_len for i in range(filled)]  # oldest first
    kept = ages[-new_len:] if new_len < filled else ages
    out = torch.zeros((new_len,) + tuple(rows.shape[1:]), dtype=rows.dtype)
    if fill is not None:
        out[:] = fill
    if kept:
        out[: len(kept)] = rows[kept]
    return out, len(kept) % new_len, len(kept)
