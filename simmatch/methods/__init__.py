"""Methods by name: each turns model outputs into losses; the engine is shared.

Importing this package registers every method; `build_method` looks the configured name up
in the registry and lets the class build itself from the config.
"""
from __future__ import annotations

import torch

from simmatch.config import Config, Derived
from simmatch.methods import fixmatch, isd, simmatch, supervised  # noqa: F401  (registers them)
from simmatch.methods.base import Method
from simmatch.methods.registry import METHODS, register

__all__ = ["METHODS", "Method", "build_method", "register"]


def build_method(cfg: Config, derived: Derived, bank_labels: torch.Tensor) -> Method:
    """The method named by `cfg.method.name`, with a freshly initialised student."""
    try:
        cls = METHODS[cfg.method.name]
    except KeyError:
        raise NotImplementedError(f"method.name={cfg.method.name!r} is not available") from None
    return cls.from_config(cfg, derived, bank_labels)
