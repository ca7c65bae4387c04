"""Methods: each turns model outputs into losses; the engine is shared.

Every method has a card (`card.py`: its config section, facts, scaled quantities and recipe
lines, torch-free) and a class (torch). The built-in ones are the packages here, whose cards
register when this package is imported; `build_method` imports the configured method's class
(the card's `module`) and lets it build itself from its section of the config.
"""
from __future__ import annotations

import importlib
from typing import Any

from simmatch.methods import fixmatch, isd, remixmatch, simmatch, simmatchv2, supervised  # noqa: F401  (their cards)
from simmatch.methods.card import CARDS, CLASSES, MethodCard, Scaled, card_of, register, register_card

__all__ = ["CARDS", "MethodCard", "Scaled", "build_method", "card_of", "register", "register_card"]


def build_method(cfg: Any, derived: Any, bank_labels: Any, ranks_per_forward: int = 1) -> Any:
    """The method named by `cfg.method.name` (a `base.Method`), with a freshly initialised student;
    `ranks_per_forward`: the ranks of a BN group one forward of this process normalises together."""
    card = card_of(cfg.method.name)
    if card.module is not None:
        importlib.import_module(card.module)
    method = CLASSES[card.name].from_config(cfg, cfg.method.params, derived, bank_labels)
    method.ranks_per_forward = ranks_per_forward
    return method
