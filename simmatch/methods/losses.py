"""Loss helpers shared by the methods: full-precision regions and cross-entropies on logits.

Every cross-entropy takes logits and uses log_softmax (log(softmax) underflows to -inf under
reduced precision and turns a zero-weighted term into NaN).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def fp32(device: torch.device):
    """Autocast off: targets and losses are computed in full precision."""
    return torch.autocast(device_type=device.type, enabled=False)


def soft_cross_entropy(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-sample H(target, softmax(logits)) for a soft target (rows summing to 1)."""
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1)


def hard_cross_entropy(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of integer labels (FixMatch's argmax pseudo-labels)."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


def pseudo_label_metrics(pred: torch.Tensor, mask: torch.Tensor, y_u: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mask rate and pseudo-label accuracy (over all and over masked samples) where the true
    label is known (y >= 0); stays on the device, no host sync."""
    known = (y_u >= 0).float()
    correct = (pred == y_u).float() * known
    return {
        "mask": mask.mean(),
        "pl_acc": correct.sum() / known.sum().clamp(min=1),
        "pl_acc_masked": (correct * mask).sum() / (known * mask).sum().clamp(min=1),
    }
