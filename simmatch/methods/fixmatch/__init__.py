"""FixMatch (Sohn et al., NeurIPS 2020), as its official code trains it; its card (the config
section `method.fixmatch.*` and its facts). The method itself, with torch, is method.py."""
from __future__ import annotations

from dataclasses import dataclass

from simmatch.fields import NONNEG, UNIT, num
from simmatch.methods.card import MethodCard, register_card


@dataclass
class FixMatchConfig:
    tau: float = num(0.95, UNIT)  # its paper: 0.95 on CIFAR/SVHN/STL, 0.7 on ImageNet
    lambda_u: float = num(1.0, NONNEG)  # its paper's and code's weight of the unlabeled loss


CARD = register_card(MethodCard(
    "fixmatch", FixMatchConfig, "simmatch.methods.fixmatch.method", needs_labeled=True, needs_unlabeled=True,
    trains_classifier=True, configured_teacher=False,  # the EMA is only evaluated
    student_images=(1, 1, 1),  # one student forward over cat(labeled, weak, strong views)
    renamed={"fixmatch_tau": "tau", "lambda_u": "lambda_u"}))
