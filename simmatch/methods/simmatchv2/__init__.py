"""SimMatchV2 (ICCV 2023): graph pseudo-labels over the labeled bank and consistency of relations to
an unlabeled bank; its card (`method.simmatchv2.*`, facts, recipe lines). The method itself, with
torch, is method.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from simmatch.fields import COUNT, NONNEG, UNIT, Range, above, num
from simmatch.methods.card import MethodCard, Scaled, labeled_bank_bytes, register_card


@dataclass
class SimMatchV2Config:
    """The graph over the weak view and its top-n labeled neighbours (propagation strength alpha),
    an unlabeled bank of k global unlabeled batches, DA by a running mean (momentum per step of the
    reference batch), and the node-node / edge-edge / node-edge loss weights; tau its threshold."""

    tau: float = num(0.7, UNIT)
    temperature: float = num(0.1, above(0))
    topn: int = num(128, COUNT)
    alpha: float = num(0.1, Range(0.0, 1.0, hi_open=True))
    k: int = num(256, COUNT)
    da_momentum: float = num(0.9, UNIT)
    lambda_nn: float = num(10.0, NONNEG)
    lambda_ee: float = num(10.0, NONNEG)
    lambda_ne: float = num(10.0, NONNEG)


def _memory(cfg: Any, m: SimMatchV2Config, values: dict, num_labeled: int) -> dict[str, int]:
    return {"labeled bank": labeled_bank_bytes(num_labeled, cfg.model.proj_dim),
            "unlabeled bank": values["k"] * (cfg.model.proj_dim + cfg.data.num_classes) * 4}


def _recipe(cfg: Any, m: SimMatchV2Config, values: dict) -> tuple[list[str], dict]:
    k, weights = values["k"], {"nn": m.lambda_nn, "ee": m.lambda_ee, "ne": m.lambda_ne}
    lines = [f"  banks        unlabeled K = {k:,} ({m.k} global unlabeled batches); graph of the top {m.topn}, "
             f"alpha {m.alpha:g}; losses nn / ee / ne x {m.lambda_nn:g} / {m.lambda_ee:g} / {m.lambda_ne:g}",
             f"  DA           running mean of the batch mean, momentum {values['da_momentum']:.6g} "
             f"(method.simmatchv2.da_momentum={m.da_momentum:g} per step of the reference batch)"]
    return lines, {"unlabeled_bank": k, "loss_weights": weights, "da_momentum": values["da_momentum"]}


CARD = register_card(MethodCard(
    "simmatchv2", SimMatchV2Config, "simmatch.methods.simmatchv2.method", needs_labeled=True,
    needs_unlabeled=True, trains_classifier=True, configured_teacher=True,
    # student: cat(labeled, first strong view), then each further view on its own; teacher: cat(labeled, weak)
    student_images=(1, 1, 0), teacher_images=(1, 1), views_apart=True,
    scaled=(Scaled("k", "global_unlabeled_batches", "unlabeled bank"),
            Scaled("da_momentum", "momentum", "DA momentum")),
    renamed={"tau": "tau", "temperature": "temperature", "v2_topn": "topn", "v2_alpha": "alpha", "v2_k": "k",
             "v2_da_momentum": "da_momentum", "lambda_nn": "lambda_nn", "lambda_ee": "lambda_ee",
             "lambda_ne": "lambda_ne"},
    memory=_memory, recipe=_recipe))
