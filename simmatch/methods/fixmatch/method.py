"""FixMatch (Sohn et al., NeurIPS 2020), as its official code (google-research/fixmatch) trains it.

One student forward in train mode over labeled + weak + strong images (one BN batch); the
pseudo-label of an unlabeled image is the argmax of the student's own weak-view softmax
(detached), kept where that softmax's maximum reaches `method.fixmatch.tau` (0.95 in the
paper's CIFAR/SVHN/STL runs, 0.7 on ImageNet); loss = CE(labels, labeled logits) + lambda_u *
mean(mask * CE(pseudo-label, strong logits)). No distribution alignment, no soft targets, no
bank. The EMA model is only evaluated (the official code's tf.train.ExponentialMovingAverage
over the model variables, BN statistics included: an EMAN-style copy here).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from simmatch.methods.base import Batch, Method, Targets
from simmatch.methods.card import register
from simmatch.methods.losses import fp32, hard_cross_entropy, pseudo_label_metrics
from simmatch.models import Network, network_for


@register("fixmatch")
class FixMatch(Method):
    def __init__(self, student: Network, ema_momentum: float, *, tau: float, lambda_u: float, seed: int = 0):
        super().__init__(student, ema_momentum, "eman", seed)
        self.tau, self.lambda_u = tau, lambda_u

    @classmethod
    def from_config(cls, cfg, params, derived, bank_labels: torch.Tensor) -> FixMatch:
        return cls(network_for(cfg, head=False), derived.ema_momentum, tau=params.tau, lambda_u=params.lambda_u,
                   seed=cfg.train.seed)

    def student_losses(self, student, labeled: Batch, unlabeled: Batch | None, targets: Targets,
                       iteration: int) -> dict[str, torch.Tensor]:
        """Its targets come from the same forward (the student's own weak view): none before."""
        assert unlabeled is not None
        b, bu = labeled["x"].shape[0], unlabeled["weak"].shape[0]
        strong = list(unlabeled["strong"])
        with self.timer("student_forward"):
            logits, _ = student(torch.cat([labeled["x"], unlabeled["weak"], *strong]))
        with fp32(logits.device), self.timer("losses"):
            loss_x = F.cross_entropy(logits[:b].float(), labeled["y"])
            probs = torch.softmax(logits[b:b + bu].detach().float(), dim=1)
            conf, pred = probs.max(dim=1)
            mask = (conf >= self.tau).float()
            loss_u = logits.new_zeros((), dtype=torch.float32)
            for k in range(len(strong)):  # augmentation anchoring: every strong view, same label
                part = slice(b + (k + 1) * bu, b + (k + 2) * bu)
                loss_u = loss_u + (hard_cross_entropy(pred, logits[part]) * mask).mean()
            loss_u = loss_u / len(strong)
            return {
                "loss": loss_x + self.lambda_u * loss_u,
                "loss_x": loss_x.detach(),
                "loss_u": loss_u.detach(),
                **pseudo_label_metrics(pred, mask, unlabeled["y"]),
            }
