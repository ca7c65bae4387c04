"""SimMatch (CVPR 2022): class and instance pseudo-labels that propagate through a labeled bank;
its card (the config section `method.simmatch.*`, its facts and recipe lines). The method itself,
with torch, is method.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from simmatch.errors import ConfigError
from simmatch.fields import COUNT, NONNEG, UNIT, Range, above, num
from simmatch.methods.card import MethodCard, Scaled, labeled_bank_bytes, register_card


@dataclass
class SimMatchConfig:
    tau: float = num(0.7, UNIT)  # confidence threshold of the class pseudo-label
    temperature: float = num(0.1, above(0))  # t of the similarity softmax
    alpha: float = num(0.9, UNIT)  # blend of p_w and the aggregated q_w
    lambda_u: float = num(10.0, NONNEG)
    lambda_in: float = num(5.0, NONNEG)
    use_bank: bool = True  # false: SimMatch without the labeled bank (no L_in, no propagation), an ablation
    dist_align: bool = True
    da_len: int = num(256, COUNT)  # batch means in the DA queue, per step of the reference batch
    # uniform: SimMatch's DA (da_len batch means, uniform target); labeled: ReMixMatch's DA
    # (remixmatch_da_len-entry average initialised uniform, labeled-label marginal as target)
    # followed by its sharpening with remixmatch_t
    da_target: Literal["uniform", "labeled"] = "uniform"
    remixmatch_da_len: int = num(128, COUNT)
    remixmatch_t: float = num(0.5, above(0))
    bank_momentum: float = num(0.0, Range(0.0, 1.0, hi_open=True))  # 0: overwrite rows; >0: temporal ensemble
    propagate_after_epochs: int = num(0, NONNEG)  # official: L_in and aggregation start after epoch 0
    # >0: they start after this many iterations instead (USB's CIFAR runs: after its first "epoch" of
    # 1,024 iterations, which is not a pass over the unlabeled set)
    propagate_after_iters: int = num(0, NONNEG)
    # teacher: the weak view's logits and embeddings, and the bank's rows, come from the teacher
    # (model.teacher). student: from the student's own forward of labeled + weak + strong images,
    # detached, with no teacher network; the EMA is only evaluated (USB's CIFAR and SVHN reading of
    # the paper's small-K variant, with bank_momentum). As in that code the head has a zero gradient
    # before L_in starts (L_in x 0), so weight decay and momentum act on it.
    targets: Literal["teacher", "student"] = "teacher"
    # The paper's Table 5 (ImageNet 1%, 100 epochs: 61.7 with both, 59.9 without scaling, 52.3 without
    # smoothing). scaling false: the class pseudo-label is the aligned weak prediction, p_hat = p_w (no
    # aggregated q_w joins it). smoothing false: the instance pseudo-label is the bank similarity, q_hat =
    # q_w (no unfolded p_w rescales it).
    scaling: bool = True
    smoothing: bool = True


def l_in_start(m: SimMatchConfig, values: dict) -> int | None:
    """The iteration where L_in and the aggregation start (None: unknown without the data)."""
    return values["propagate_after_iters"] if m.propagate_after_iters else values.get("propagate_after_epochs")


def _validate(cfg: Any, m: SimMatchConfig) -> None:
    for key, on in (("scaling", m.scaling), ("smoothing", m.smoothing)):
        if not on and not m.use_bank:
            raise ConfigError(f"method.simmatch.{key}=false changes the bank's pseudo-labels: with method.simmatch."
                              f"use_bank=false there are none (p_hat = p_w, no L_in)")
    if not m.scaling and m.alpha == 1.0:
        raise ConfigError("method.simmatch.scaling=false has no effect with method.simmatch.alpha=1 (p_hat = p_w "
                          "already)")
    if not m.smoothing and m.lambda_in == 0.0:
        raise ConfigError("method.simmatch.smoothing=false changes q_hat, the target of L_in: with method.simmatch."
                          "lambda_in=0 no loss uses it")
    if m.targets == "student" and cfg.model.teacher != "eman":
        raise ConfigError(f"method.simmatch.targets=student makes its targets with the student: model.teacher="
                          f"{cfg.model.teacher} would make none (set model.teacher=eman, the EMA then only evaluated)")


def _memory(cfg: Any, m: SimMatchConfig, values: dict, num_labeled: int) -> dict[str, int]:
    return {"labeled bank": labeled_bank_bytes(num_labeled, cfg.model.proj_dim)} if m.use_bank else {}


def _recipe(cfg: Any, m: SimMatchConfig, values: dict) -> tuple[list[str], dict]:
    lines, entries = [], {}
    if m.use_bank:
        start = l_in_start(m, values)
        key = (f"propagate_after_iters={m.propagate_after_iters}" if m.propagate_after_iters
               else f"propagate_after_epochs={m.propagate_after_epochs}")
        lines.append(f"  L_in         starts at iteration {'unknown' if start is None else f'{start:,}'} "
                     f"(method.simmatch.{key})")
        entries["l_in_start_iter"] = start
    if m.use_bank:
        k = values.get("num_labeled")
        kind = (f"a temporal ensemble: row <- normalize({m.bank_momentum:g} row + {1 - m.bank_momentum:g} new)"
                if m.bank_momentum > 0 else "each row overwritten by its image's newest embedding")
        lines.append(f"  bank         K = {'unknown' if k is None else f'{k:,}'} rows, one per labeled image; {kind} "
                     f"(method.simmatch.bank_momentum={m.bank_momentum:g})")
        entries["bank_rows"] = k
        p_hat = (f"{m.alpha:g} p_w + {1 - m.alpha:g} q_agg" if m.scaling else "p_w, no aggregated q_w (an ablation)")
        q_hat = "normalize(q_w * p_unfold)" if m.smoothing else "q_w, no unfolded p_w (an ablation)"
        lines.append(f"  pseudo-label p_hat = {p_hat} (method.simmatch.scaling={str(m.scaling).lower()}); "
                     f"q_hat = {q_hat} (method.simmatch.smoothing={str(m.smoothing).lower()})")
    if m.targets == "student":
        lines.append("  targets      the student's own weak view, detached, from its forward of labeled + weak + "
                     "strong images (method.simmatch.targets=student); the EMA is only evaluated")
    if m.dist_align and m.da_target == "labeled":
        lines.append(f"  DA           ReMixMatch's: {values['remixmatch_da_len']} batch means, labeled-label marginal "
                     f"as target, sharpening T={m.remixmatch_t:g}")
        entries["da_len"] = values["remixmatch_da_len"]
    elif m.dist_align:
        lines.append(f"  DA queue     {values['da_len']} batch means")
        entries["da_len"] = values["da_len"]
    return lines, entries


CARD = register_card(MethodCard(
    "simmatch", SimMatchConfig, "simmatch.methods.simmatch.method", needs_labeled=True, needs_unlabeled=True,
    trains_classifier=True, configured_teacher=True,
    student_images=(1, 0, 1), teacher_images=(1, 1),  # student: cat(labeled, strong views); teacher: cat(labeled, weak)
    scaled=(Scaled("da_len", "steps", "DA queue"), Scaled("remixmatch_da_len", "steps", "ReMixMatch's DA buffer"),
            Scaled("propagate_after_epochs", "epochs", "L_in start"),
            Scaled("propagate_after_iters", "iterations", "L_in start")),
    renamed={k: k for k in ("tau", "temperature", "alpha", "lambda_u", "lambda_in", "use_bank", "dist_align",
                            "da_len", "da_target", "remixmatch_da_len", "remixmatch_t", "bank_momentum",
                            "propagate_after_epochs")},
    memory=_memory, recipe=_recipe, validate=_validate))
