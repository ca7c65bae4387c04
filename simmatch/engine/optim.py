"""The optimizers (SGD with decay only on weights; ReMixMatch's Adam with decoupled decay) and
the LR as a pure function of the iteration."""
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


class DecoupledAdam(torch.optim.Optimizer):
    """Adam as TensorFlow computes it (tf.train.AdamOptimizer), then decoupled weight decay, as
    ReMixMatch's code trains: lr_t = lr sqrt(1 - b2^t) / (1 - b1^t), w <- w - lr_t m / (sqrt(v) + eps),
    then w <- w (1 - lr x weight_decay) for the weights of its group (its code multiplies every
    kernel after the Adam step). torch's Adam puts eps inside the bias correction
    (m_hat / (sqrt(v_hat) + eps)), a different step while v is small; torch's AdamW decays before
    the step. Both would move the published run, hence this class."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["m"], state["v"]
                m.mul_(b1).add_(p.grad, alpha=1.0 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1.0 - b2)
                lr_t = group["lr"] * (1.0 - b2 ** t) ** 0.5 / (1.0 - b1 ** t)
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-lr_t)
                if group["weight_decay"]:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
        return loss


def build_optimizer(model: nn.Module, cfg: Config, lr: float) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "adam":
        return DecoupledAdam(param_groups(model, o.weight_decay, o.decay_bn_bias), lr=lr)
    kwargs = {"foreach": o.impl == "foreach"}
    if o.impl == "fused":
        kwargs = {"fused": True}
    elif o.impl == "plain":
        kwargs = {"foreach": False}
    return torch.optim.SGD(param_groups(model, o.weight_decay, o.decay_bn_bias), lr=lr,
                           momentum=o.momentum, nesterov=o.nesterov, **kwargs)


def lr_at(iteration: int, base_lr: float, warmup_iters: int, total_iters: int,
          schedule: str = "cosine", epoch_steps: int = 0) -> float:
    """Linear warm-up to `base_lr`, then, per iteration, `cosine` to zero, FixMatch's
    cos(7 pi k / 16 K) decay (`fixmatch`: its code and USB's, with k counted after the warm-up) or
    `constant` (ReMixMatch's). `epoch_steps` > 0 (optim.lr_step=epoch): after the warm-up, each
    epoch of that many steps keeps the value of its first step (not before the warm-up's end), as the
    SimMatch authors' adjust_learning_rate called once per epoch; the warm-up stays per iteration."""
    if iteration < warmup_iters:
        return base_lr * (iteration + 1) / warmup_iters
    if epoch_steps > 0:
        iteration = max(warmup_iters, iteration // epoch_steps * epoch_steps)
    span = max(1, total_iters - warmup_iters)
    progress = min(1.0, (iteration - warmup_iters) / span)
    if schedule == "constant":
        return base_lr
    if schedule == "fixmatch":
        return base_lr * math.cos(7.0 * math.pi * progress / 16.0)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
