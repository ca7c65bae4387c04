"""FIFO memory of embeddings (ISD, MoCo-style): the same on every rank, enqueued after the loss."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from simmatch import distributed as dist


class EmbeddingQueue(nn.Module):
    """[size x dim] unit rows, written round-robin. `push` all-gathers every rank's rows first
    (rank order), so all ranks write the same rows at the same positions."""

    def __init__(self, size: int, dim: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("features", F.normalize(torch.randn(size, dim, generator=gen), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, rows: torch.Tensor) -> None:
        rows = dist.all_gather_cat(rows.detach().float())
        size = self.features.shape[0]
        n = rows.shape[0]
        if n > size:
            rows, n = rows[-size:], size
        positions = (self.ptr + torch.arange(n, device=rows.device)) % size
        self.features.index_copy_(0, positions, rows)
        self.ptr.copy_((self.ptr + n) % size)
