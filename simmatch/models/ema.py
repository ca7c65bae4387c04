"""EMA teachers: EMAN-style (parameters and BN statistics averaged, eval mode) or the classic
parameter-only EMA that runs in train mode (BN on the batch's statistics, with shuffle-BN)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float, buffers: bool = True) -> None:
    """teacher <- m * teacher + (1 - m) * student for parameters and, with `buffers`, floating
    buffers (foreach ops), integer buffers (BN's num_batches_tracked) then being copied. Without
    `buffers` the teacher's buffers are its own (a train-mode teacher's BN running statistics)."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    pairs = [(t_params, s_params)]
    if buffers:
        pairs.append(([b for b in teacher.buffers() if b.is_floating_point()],
                      [b for b in student.buffers() if b.is_floating_point()]))
    for t_list, s_list in pairs:
        if not t_list:
            continue
        if momentum == 0.0:
            torch._foreach_copy_(t_list, s_list)
        elif momentum != 1.0:
            torch._foreach_lerp_(t_list, s_list, 1.0 - momentum)
    if not buffers:
        return
    for t_buf, s_buf in zip(teacher.buffers(), student.buffers()):
        if not t_buf.is_floating_point():
            t_buf.copy_(s_buf)


TEACHER_MODES = ("eman", "ema_shuffle_bn")


class EMA(nn.Module):
    """A frozen copy of the student that follows it by EMA.

    mode "eman": parameters and BN buffers averaged, always in eval mode (BN uses the averaged
    statistics, so no shuffle-BN is needed). mode "ema_shuffle_bn" (MoCo, and SimMatch's
    published runs): parameters only, in train mode while the method trains, so BN normalises
    with the batch's statistics; the caller shuffles the batch across ranks around the forward
    (`Method.teacher_forward`). In eval mode (evaluation) it uses its own running statistics.
    """

    def __init__(self, student: nn.Module, momentum: float, mode: str = "eman"):
        super().__init__()
        if mode not in TEACHER_MODES:
            raise ValueError(f"teacher mode {mode!r} is not one of {', '.join(TEACHER_MODES)}")
        self.module = copy.deepcopy(student)
        self.module.requires_grad_(False)
        self.module.eval()
        self.momentum = momentum
        self.mode = mode

    @property
    def shuffle_bn(self) -> bool:
        return self.mode == "ema_shuffle_bn"

    def train(self, mode: bool = True) -> EMA:
        super().train(mode)
        self.module.train(mode and self.shuffle_bn)
        return self

    def update(self, student: nn.Module) -> None:
        ema_update(self.module, student, self.momentum, buffers=not self.shuffle_bn)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
