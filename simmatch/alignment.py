"""Distribution alignment (ReMixMatch): scale predictions by target marginal / running model marginal."""
from __future__ import annotations

import torch
import torch.nn as nn

from simmatch import distributed as dist


class DistributionAlignment(nn.Module):
    """p <- normalize(p * p_target / p_model), p_model = mean of the last `length` batch means.

    The batch mean is averaged over ranks before it enters the FIFO, so every rank aligns the
    same way. `target` None means uniform (SimMatch); otherwise a class marginal, e.g. that of
    the labeled labels (ReMixMatch).
    """

    def __init__(self, num_classes: int, length: int = 256, target: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("queue", torch.zeros(length, num_classes))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        if target is None:
            target = torch.full((num_classes,), 1.0 / num_classes)
        self.register_buffer("target", target.float() / target.float().sum())

    @torch.no_grad()
    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        probs = probs.float()
        mean = dist.all_reduce_mean(probs.mean(dim=0))
        length = self.queue.shape[0]
        self.queue.index_copy_(0, self.ptr.view(1), mean.view(1, -1))
        self.ptr.copy_((self.ptr + 1) % length)
        self.count.copy_(torch.clamp(self.count + 1, max=length))
        # Rows not yet written are zero: the sum over all rows divided by the filled count.
        p_model = self.queue.sum(dim=0) / self.count.clamp(min=1)
        aligned = probs * self.target / p_model.clamp(min=1e-12)
        return aligned / aligned.sum(dim=1, keepdim=True)


def label_marginal(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class frequencies of the labeled set (a smoothed count, so no class has zero mass)."""
    counts = torch.bincount(labels.long(), minlength=num_classes).float() + 1e-3
    return counts / counts.sum()
