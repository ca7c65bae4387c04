"""Methods by name: each turns model outputs into losses; the engine is shared."""
from __future__ import annotations

import torch

from simmatch.alignment import label_marginal
from simmatch.config import Config, Derived
from simmatch.methods.base import Method
from simmatch.models import build_network


def build_method(cfg: Config, derived: Derived, bank_labels: torch.Tensor) -> Method:
    """The method named by `cfg.method.name`, with a freshly initialised student."""
    m = cfg.method
    uses_head = m.name == "simmatch"
    student = build_network(cfg.model.arch, cfg.data.num_classes, cfg.model.small_input,
                            cfg.model.proj_dim if uses_head else 0)
    if m.name == "supervised":
        from simmatch.methods.supervised import Supervised

        return Supervised(student, derived.ema_momentum)
    if m.name in ("simmatch", "fixmatch"):
        from simmatch.methods.simmatch import SimMatch

        target = label_marginal(bank_labels, cfg.data.num_classes) if m.da_target == "labeled" else None
        return SimMatch(
            student, derived.ema_momentum, bank_labels, cfg.data.num_classes,
            tau=m.tau, temperature=m.temperature, alpha=m.alpha, lambda_u=m.lambda_u,
            lambda_in=m.lambda_in if uses_head else 0.0, dist_align=m.dist_align,
            da_len=derived.da_len, da_target=target, bank_momentum=m.bank_momentum,
            propagate_after_iters=derived.propagate_after_iters, use_bank=uses_head,
            seed=cfg.train.seed)
    if m.name == "isd":
        from simmatch.methods.isd import ISD

        student = build_network(cfg.model.arch, cfg.data.num_classes, cfg.model.small_input,
                                cfg.model.proj_dim, m.predictor_hidden)
        return ISD(student, derived.ema_momentum, m.queue_size, m.isd_t_student, m.isd_t_teacher,
                   seed=cfg.train.seed)
    raise NotImplementedError(f"method.name={m.name!r} is not available")
