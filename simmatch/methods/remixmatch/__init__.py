"""ReMixMatch (Berthelot et al., ICLR 2020), as its official code trains it (google-research/remixmatch,
cta/cta_remixmatch.py); its card (the config section `method.remixmatch.*`, its facts and recipe
lines). The method itself, with torch, is method.py; CTAugment, the policy it learns, ctaugment.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from simmatch.errors import ConfigError
from simmatch.fields import COUNT, NONNEG, UNIT, above, num
from simmatch.methods.card import MethodCard, Scaled, register_card


@dataclass
class ReMixMatchConfig:
    """Its code's flags: beta (mixup_alpha), T, w_match (lambda_u), w_kl (lambda_u1, the loss of the
    first strong view before MixUp), w_rot, warmup_kimg (rampup_iters, in steps of the reference
    batch: 1,024 kimg at 64 images a step = 16,384), use_dm (dist_align), dbuf (da_len); CTAugment's
    adepth, ath and adecay. K, the strong views, is data.num_strong."""

    mixup_alpha: float = num(0.75, above(0))
    temperature: float = num(0.5, above(0))
    lambda_u: float = num(1.5, NONNEG)
    lambda_u1: float = num(0.5, NONNEG)
    lambda_rot: float = num(0.5, NONNEG)
    rampup_iters: int = num(16384, NONNEG)  # lambda_u and lambda_u1 grow linearly from 0 over these steps
    dist_align: bool = True
    da_len: int = num(128, COUNT)  # batch means in the model-marginal buffer, per step of the reference batch
    # true: the labeled images and the strong views get CTAugment's learned policy (the pipeline
    # only flips and translates them: data.randaug_n=0, data.cutout=false); false: the views as
    # the pipeline makes them (USB's reading: FixMatch's RandAugment)
    ctaugment: bool = True
    cta_depth: int = num(2, COUNT)  # ops per policy
    cta_threshold: float = num(0.8, UNIT)  # bins whose normalised rate is below are never drawn
    cta_decay: float = num(0.99, UNIT)  # rate <- decay rate + (1 - decay) accuracy


def _validate(cfg: Any, m: ReMixMatchConfig) -> None:
    if cfg.train.mu != 1:
        raise ConfigError(f"train.mu={cfg.train.mu}: ReMixMatch mixes the labeled batch with unlabeled batches "
                          f"of its own size (one per view), as its code does: set train.mu=1 (data.num_strong "
                          f"gives the views)")
    if cfg.model.teacher != "eman":
        raise ConfigError(f"model.teacher={cfg.model.teacher}: ReMixMatch's EMA is only evaluated (and judges "
                          f"CTAugment's probes): set model.teacher=eman")
    d = cfg.data
    if m.ctaugment and (d.augment != "translate" or d.randaug_n or d.cutout):
        raise ConfigError(f"method.remixmatch.ctaugment=true: CTAugment makes the strong views' and labeled "
                          f"images' photometric part on the flipped and translated views: set "
                          f"data.augment=translate, data.strong=fixmatch_ra, data.randaug_n=0, data.cutout=false "
                          f"(now data.augment={d.augment}, data.randaug_n={d.randaug_n}, data.cutout="
                          f"{str(d.cutout).lower()})")


def _recipe(cfg: Any, m: ReMixMatchConfig, values: dict) -> tuple[list[str], dict]:
    k = cfg.data.num_strong
    ramp = values["rampup_iters"]
    lines = [
        f"  views        K = {k} strong view(s) per unlabeled image and its weak view (data.num_strong={k}); "
        f"the guess: the weak view's prediction"
        + (f", aligned ({values['da_len']} batch means toward the labeled-label marginal)" if m.dist_align else "")
        + f", sharpened T = {m.temperature:g}",
        f"  MixUp        alpha {m.mixup_alpha:g} over labeled + weak + strong views (lambda = max(l, 1 - l))",
        f"  losses       labeled + {m.lambda_u:g} x mixed unlabeled + {m.lambda_u1:g} x first strong view before "
        f"MixUp + {m.lambda_rot:g} x rotation (4-way, first strong view)",
        f"  ramp-up      lambda_u and lambda_u1 grow linearly from 0 over {ramp:,} iterations "
        f"(method.remixmatch.rampup_iters={m.rampup_iters})",
        "  CTAugment    " + (f"labeled images and strong views: {m.cta_depth} ops per policy, bins below "
                             f"{m.cta_threshold:g} of the best never drawn, rates decay {m.cta_decay:g}; "
                             f"learned from the EMA's predictions on probe images"
                             if m.ctaugment else "off (the strong views as the data pipeline makes them)"),
    ]
    entries = {"strong_views": k, "mixup_alpha": m.mixup_alpha, "temperature": m.temperature,
               "loss_weights": {"u": m.lambda_u, "u1": m.lambda_u1, "rot": m.lambda_rot},
               "rampup_iters": ramp, "ctaugment": m.ctaugment}
    if m.dist_align:
        entries["da_len"] = values["da_len"]
    return lines, entries


CARD = register_card(MethodCard(
    "remixmatch", ReMixMatchConfig, "simmatch.methods.remixmatch.method", needs_labeled=True,
    needs_unlabeled=True, trains_classifier=True, configured_teacher=False,  # the EMA is only evaluated
    # every student forward is b images: the weak view, the first strong view, the rotated one and
    # each of the K + 2 interleaved MixUp batches
    student_images=(1, 0, 0),
    scaled=(Scaled("rampup_iters", "iterations", "ramp-up"), Scaled("da_len", "steps", "DA buffer")),
    recipe=_recipe, validate=_validate))
