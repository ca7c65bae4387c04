"""What every method shares: a student, its EMA teacher, and the engine-facing interface."""
from __future__ import annotations

import torch
import torch.nn as nn

from simmatch.engine.timer import NO_TIMER, PhaseTimer
from simmatch.models import EMA, Network

Batch = dict[str, torch.Tensor]


class Method(nn.Module):
    """Owns the model-side state (student, teacher, banks, queues) as submodules and buffers,
    so `state_dict()` is everything a checkpoint needs from it. The engine owns the rest."""

    needs_labeled: bool = True
    trains_classifier: bool = True  # False: evaluated by k-NN on the trunk's features
    needs_unlabeled: bool = True
    timer: PhaseTimer = NO_TIMER  # benchmarks swap in an enabled one

    def __init__(self, student: Network, ema_momentum: float):
        super().__init__()
        self.student = student
        self.teacher = EMA(student, ema_momentum)

    def training_losses(self, student: nn.Module, labeled: Batch | None, unlabeled: Batch | None,
                        iteration: int) -> dict[str, torch.Tensor]:
        """`loss` (differentiable) plus detached scalar diagnostics. `student` may be DDP-wrapped."""
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self) -> None:
        """Called after every optimizer step."""
        with self.timer("ema"):
            self.teacher.update(self.student)
