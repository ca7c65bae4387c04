"""Supervised-only baseline on the labeled stream: the yardstick for the semi-supervised gain."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from simmatch.methods.base import Batch, Method, Targets
from simmatch.methods.card import register
from simmatch.models import network_for


@register("supervised")
class Supervised(Method):
    @classmethod
    def from_config(cls, cfg, params, derived, bank_labels: torch.Tensor) -> Supervised:
        # the EMA is only evaluated: it averages BN statistics too (EMAN-style, its card)
        return cls(network_for(cfg, head=False), derived.ema_momentum, cls.card.teacher(cfg), cfg.train.seed)

    def student_losses(self, student, labeled: Batch, unlabeled: Batch | None, targets: Targets,
                       iteration: int) -> dict[str, torch.Tensor]:
        logits, _ = student(labeled["x"])
        loss = F.cross_entropy(logits.float(), labeled["y"])
        return {"loss": loss, "loss_x": loss.detach()}
