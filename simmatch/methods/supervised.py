"""Supervised-only baseline on the labeled stream: the yardstick for the semi-supervised gain."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from simmatch.methods.base import Batch, Method


class Supervised(Method):
    needs_unlabeled = False

    def training_losses(self, student, labeled: Batch, unlabeled: Batch | None,
                        iteration: int) -> dict[str, torch.Tensor]:
        logits, _ = student(labeled["x"])
        loss = F.cross_entropy(logits.float(), labeled["y"])
        return {"loss": loss, "loss_x": loss.detach()}
