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
