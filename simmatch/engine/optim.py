"""SGD with decay only on weights, and the LR as a pure function of the iteration."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from simmatch.config import Config


def param_groups(model: nn.Module, weight_decay: float, decay_bn_bias: bool) -> list[dict]:
    """BN parameters and biases (every tensor of dimension <= 1) get no decay unless asked."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if decay_bn_bias or p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: Config, lr: float) -> torch.optim.Optimizer:
    o = cfg.optim
    kwargs = {"foreach": o.impl == "foreach"}
    if o.impl == "fused":
        kwargs = {"fused": True}
    elif o.impl == "plain":
        kwargs = {"foreach": False}
    return torch.optim.SGD(param_groups(model, o.weight_decay, o.decay_bn_bias), lr=lr,
                           momentum=o.momentum, nesterov=o.nesterov, **kwargs)


def lr_at(iteration: int, base_lr: float, warmup_iters: int, total_iters: int,
          schedule: str = "cosine") -> float:
    """Linear warm-up to `base_lr`, then, per iteration, `cosine` to zero or FixMatch's
    cos(7 pi k / 16 K) decay (`fixmatch`: its code and USB's, with k counted after the warm-up)."""
    if iteration < warmup_iters:
        return base_lr * (iteration + 1) / warmup_iters
    span = max(1, total_iters - warmup_iters)
    progress = min(1.0, (iteration - warmup_iters) / span)
    if schedule == "fixmatch":
        return base_lr * math.cos(7.0 * math.pi * progress / 16.0)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
