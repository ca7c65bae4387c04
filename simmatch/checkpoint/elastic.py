"""Elastic resume: what a checkpoint written by W ranks becomes on W' ranks.

Ranks here are a run's ranks, however many processes computed them (train.virtual_world_size):
a run of 8 ranks continued on 4 processes as 8 virtual ranks is the same run, not re-scaled, and
is no elastic resume; only another number of ranks is.

Exact across world sizes: weights, teacher, bank, optimizer and scaler (replicated on every
rank), and the data position (the epoch's images consumed by all ranks together, see
`data.sharding.ShardPlan.tail_*`). Re-expressed: the iteration, in steps of the new global batch so
that the schedule (warm-up, cosine, intervals, all per step of the reference batch under
`train.scale=per_gpu`) stays continuous in images seen; the DA queues, whose length is a number
of batch means and so follows the global batch too (`methods.alignment.resize_fifo`); the
per-rank random streams, derived afresh from (seed, global rank, world size, iteration).
No torch here: the pre-flight describes an elastic resume before anything is submitted.
"""
from __future__ import annotations

from simmatch.config import Config, scale_at


def rescale_iteration(iteration: int, old_global_batch: int, new_global_batch: int) -> int:
    """The step, in steps of `new_global_batch`, at which as many images have been seen as after
    `iteration` steps of `old_global_batch` (nearest step; exact whenever it divides)."""
    if old_global_batch == new_global_batch:
        return iteration
    return int(round(iteration * old_global_batch / new_global_batch))


def describe(cfg: Config, old_world: int, new_world: int, iteration: int, total_iters: int | None = None) -> str:
    """One line saying what an elastic resume from `old_world` to `new_world` ranks changes: the
    runs' ranks, virtual ones included, so each is scaled at its ranks whatever its processes."""
    old, new = scale_at(cfg, old_world), scale_at(cfg, new_world)
    it = rescale_iteration(iteration, old.global_batch, new.global_batch)
    of = f" of {total_iters}" if total_iters else ""
    return (f"elastic resume {old_world} -> {new_world} ranks: {old.global_batch} -> {new.global_batch} "
            f"labeled images per step, lr {old.lr:.4g} -> {new.lr:.4g}, iteration {iteration} -> {it}{of}")
