"""BN running statistics of several forwards kept as that many ranks would keep them.

A rank's forward in train mode moves its BN running statistics once; the engine then averages
them over the ranks. A process that runs several ranks in turn (virtual ranks) moves them once
per forward instead, each time from the last: `RankBNStats` starts every forward from the
statistics the step began with and leaves their mean, which is what that many ranks leave after
averaging (num_batches_tracked counts one step, as on each rank).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


class RankBNStats:
    """Use: `stats = RankBNStats(module, forwards)`, then `stats.after_forward()` after each of
    the `forwards` forwards. With one forward it does nothing (the statistics are that rank's)."""

    def __init__(self, module: nn.Module, forwards: int):
        self.forwards, self.done = forwards, 0
        self.layers = [m for m in module.modules()
                       if isinstance(m, _BatchNorm) and m.track_running_stats] if forwards > 1 else []
        self.start = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                      for m in self.layers]
        self.sums: list[tuple[torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def after_forward(self) -> None:
        if not self.layers:
            return
        self.done += 1
        for i, (m, (mean, var, count)) in enumerate(zip(self.layers, self.start)):
            if len(self.sums) <= i:
                self.sums.append((m.running_mean.clone(), m.running_var.clone()))
            else:
                self.sums[i][0].add_(m.running_mean)
                self.sums[i][1].add_(m.running_var)
            if self.done < self.forwards:  # the next rank starts where the step started
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
            else:
                m.running_mean.copy_(self.sums[i][0] / self.forwards)
                m.running_var.copy_(self.sums[i][1] / self.forwards)


class RankZeroBNStats:
    """The BN running statistics rank 0 alone keeps, beside the averaged ones the engine trains with.

    The SimMatch authors' DDP broadcasts rank 0's buffers to every rank before each forward, so the
    student they evaluate carries rank 0's own running statistics. A BN update is affine in the
    statistics it starts from: after a forward (k updates), new = c start + (what the batches add),
    c = (1 - momentum)^k, or n_start / n_new for a cumulative average (momentum None). Rank 0's own
    statistics then follow without the batch statistics or another forward:
    own <- new + c (own - start), with `new` and `start` those of rank 0's forward of the step.
    """

    def __init__(self, module: nn.Module):
        self.layers = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        self.own = [t.clone() for m in self.layers for t in (m.running_mean, m.running_var)]
        self.start: list[tuple[torch.Tensor, torch.Tensor, int]] = []

    def tensors(self) -> list[torch.Tensor]:
        """running_mean, running_var of each BN layer in module order (what a checkpoint holds)."""
        return self.own

    @torch.no_grad()
    def load(self, tensors: list[torch.Tensor]) -> None:
        if len(tensors) != len(self.own) or any(a.shape != b.shape for a, b in zip(tensors, self.own)):
            raise ValueError("rank 0's BN statistics do not fit this model's BN layers")
        for mine, saved in zip(self.own, tensors):
            mine.copy_(saved)

    @torch.no_grad()
    def reset_to_current(self) -> None:
        """Start from the module's statistics (a run resumed from a checkpoint that holds none)."""
        self.load([t for m in self.layers for t in (m.running_mean, m.running_var)])

    @torch.no_grad()
    def before_forward(self) -> None:
        self.start = [(m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
                      for m in self.layers]

    @torch.no_grad()
    def after_forward(self) -> None:
        """After rank 0's forward of the step, before anything averages or resets the statistics."""
        for i, (m, (mean, var, n0)) in enumerate(zip(self.layers, self.start)):
            n = int(m.num_batches_tracked)
            c = (1.0 - m.momentum) ** (n - n0) if m.momentum is not None else n0 / max(n, 1)
            for own, start, new in ((self.own[2 * i], mean, m.running_mean), (self.own[2 * i + 1], var, m.running_var)):
                own.sub_(start).mul_(c).add_(new)
        self.start = []

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the module's statistics with rank 0's own (call twice to undo)."""
        for i, m in enumerate(self.layers):
            for own, cur in ((self.own[2 * i], m.running_mean), (self.own[2 * i + 1], m.running_var)):
                tmp = cur.clone()
                cur.copy_(own)
                own.copy_(tmp)
