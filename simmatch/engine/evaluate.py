"""Top-1 / top-5 over the validation stream, summed over ranks (each image counted once)."""
from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn as nn

from simmatch import distributed as dist


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict], autocast: AbstractContextManager | None = None,
             channels_last: bool = False) -> dict[str, float]:
    """Accuracy of `model` (returning logits first) in eval mode; restores its previous mode."""
    was_training = model.training
    model.eval()
    stats = None
    for batch in batches:
        x, y = batch["x"], batch["y"]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if "valid" in batch:  # padded samples do not count
            keep = batch["valid"].bool()
            x, y = x[keep], y[keep]
            if x.shape[0] == 0:
                continue
        with autocast or nullcontext():
            out = model(x)
        logits = (out[0] if isinstance(out, tuple) else out).float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(y.view(-1, 1))
        batch_stats = torch.stack([hit[:, :1].any(1).sum(), hit.any(1).sum(),
                                   torch.tensor(y.shape[0], device=y.device)]).double()
        stats = batch_stats if stats is None else stats + batch_stats
    model.train(was_training)
    if stats is None:
        stats = torch.zeros(3, dtype=torch.float64)
    device = next(model.parameters()).device
    total = dist.all_reduce_sum(stats.to(device)).cpu()
    n = max(1.0, float(total[2]))
    return {"top1": 100.0 * float(total[0]) / n, "top5": 100.0 * float(total[1]) / n, "count": int(total[2])}
