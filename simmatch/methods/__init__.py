"""Methods by name: each turns model outputs into losses; the engine is shared.

`simmatch.methods.spec` holds every method's facts (torch-free: the config, the recipe and the
pre-flight read them); `build_method` imports the configured method's module, whose class
registers itself (`registry.register`), and lets the class build itself from the config.
"""
from __future__ import annotations

import importlib
from typing import Any

from simmatch.methods.spec import SPECS, MethodSpec, spec_of

__all__ = ["SPECS", "MethodSpec", "build_method", "spec_of"]


def build_method(cfg: Any, derived: Any, bank_labels: Any) -> Any:
    """The method named by `cfg.method.name` (a `base.Method`), with a freshly initialised student."""
    from simmatch.methods.registry import METHODS

    spec = spec_of(cfg.method.name)
    importlib.import_module(spec.module)
    return METHODS[spec.name].from_config(cfg, derived, bank_labels)
