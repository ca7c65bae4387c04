"""The supervised-only baseline on the labeled stream (the yardstick of the semi-supervised gain);
its card. The method itself, with torch, is method.py."""
from __future__ import annotations

from dataclasses import dataclass

from simmatch.methods.card import MethodCard, register_card


@dataclass
class SupervisedConfig:
    """No keys of its own."""


CARD = register_card(MethodCard(
    "supervised", SupervisedConfig, "simmatch.methods.supervised.method", needs_labeled=True,
    needs_unlabeled=False, trains_classifier=True, configured_teacher=False, student_images=(1, 0, 0)))
