"""Exponential moving average of a module's parameters and BN buffers (EMAN-style teacher)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student for parameters and floating buffers (foreach ops);
    integer buffers (BN's num_batches_tracked) are copied."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    t_float = [b for b in teacher.buffers() if b.is_floating_point()]
    s_float = [b for b in student.buffers() if b.is_floating_point()]
    for t_list, s_list in ((t_params, s_params), (t_float, s_float)):
        if not t_list:
            continue
        if momentum == 0.0:
            torch._foreach_copy_(t_list, s_list)
        elif momentum != 1.0:
            torch._foreach_lerp_(t_list, s_list, 1.0 - momentum)
    for t_buf, s_buf in zip(teacher.buffers(), student.buffers()):
        if not t_buf.is_floating_point():
            t_buf.copy_(s_buf)


class EMA(nn.Module):
    """A frozen copy of the student that follows it by EMA and always runs in eval mode
    (its BN uses the averaged statistics, so no shuffle-BN is needed)."""

    def __init__(self, student: nn.Module, momentum: float):
        super().__init__()
        self.module = copy.deepcopy(student)
        self.module.requires_grad_(False)
        self.module.eval()
        self.momentum = momentum

    def train(self, mode: bool = True) -> "EMA":
        super().train(mode)
        self.module.eval()
        return self

    def update(self, student: nn.Module) -> None:
        ema_update(self.module, student, self.momentum)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
