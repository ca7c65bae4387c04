"""Labeled memory bank: one embedding and one label per labeled image, identical on every rank."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from simmatch import distributed as dist


class LabeledBank(nn.Module):
    """Features [K x D] and labels [K]; slot i belongs to labeled image i.

    `update` all-gathers the writes of every rank first, so all ranks apply the same rows in
    the same order and keep identical banks without any broadcast. The tensors are buffers of
    the method module (not of the DDP-wrapped student), so DDP never re-broadcasts them, and
    they travel with `state_dict()` into checkpoints.
    """

    def __init__(self, size: int, dim: int, labels: torch.Tensor, momentum: float = 0.0, seed: int = 0):
        super().__init__()
        if labels.shape != (size,):
            raise ValueError(f"bank labels must have shape ({size},), got {tuple(labels.shape)}")
        gen = torch.Generator().manual_seed(seed)  # same start on every rank
        self.register_buffer("features", F.normalize(torch.randn(size, dim, generator=gen), dim=1))
        self.register_buffer("labels", labels.clone().long())
        self.momentum = momentum

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
        """Write this rank's rows and every other rank's (a collective when distributed)."""
        features = dist.all_gather_cat(features.detach().float())
        labels = dist.all_gather_cat(labels.long())
        indices = dist.all_gather_cat(indices.long())
        keep = last_occurrences(indices)  # a labeled set smaller than the global batch repeats slots
        features, labels, indices = features[keep], labels[keep], indices[keep]
        if self.momentum > 0:
            # Temporal ensemble for small K: each ROW renormalised (not each column).
            old = self.features.index_select(0, indices)
            features = F.normalize(self.momentum * old + (1.0 - self.momentum) * features, dim=1)
        self.features.index_copy_(0, indices, features)
        self.labels.index_copy_(0, indices, labels)


def last_occurrences(indices: torch.Tensor) -> torch.Tensor:
    """Positions of the last occurrence of each distinct value of `indices`, in increasing order:
    the rows a sequential write keeps. index_copy_ keeps the last of repeated indices on the CPU
    but leaves the choice undefined on CUDA; writing each slot once makes both the same."""
    n = indices.numel()
    values, inverse = torch.unique(indices, return_inverse=True)
    last = torch.full((values.numel(),), -1, dtype=torch.long, device=indices.device)
    last.scatter_reduce_(0, inverse, torch.arange(n, device=indices.device), reduce="amax")
    return last.sort().values
