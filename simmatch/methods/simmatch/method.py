"""SimMatch (CVPR 2022): class and instance pseudo-labels that propagate through a labeled bank.

`method.simmatch.use_bank=false` is SimMatch without the bank (no L_in, no propagation: p_hat = the
aligned, soft p_w), an ablation; Sohn et al.'s FixMatch is its own method (`fixmatch.py`).
Targets are computed in fp32 under no_grad; every cross-entropy uses log_softmax.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from simmatch.methods.alignment import DistributionAlignment, ReMixMatchAlignment
from simmatch.methods.bank import LabeledBank
from simmatch.methods.base import Batch, Method, StepTargets, Targets, merge
from simmatch.methods.card import register
from simmatch.methods.losses import fp32, pseudo_label_metrics, soft_cross_entropy
from simmatch.methods.simmatch import l_in_start
from simmatch.models import Network, network_for


def pseudo_labels(p_w: torch.Tensor, q_w: torch.Tensor, bank_labels: torch.Tensor,
                  alpha: float, scaling: bool = True, smoothing: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """SimMatch's label propagation.

    p_w [B x C]: aligned class probabilities of the weak view (rows sum to 1).
    q_w [B x K]: similarity distribution over the bank (rows sum to 1).
    bank_labels [K]: class of each bank slot.
    Returns p_hat [B x C] = alpha p_w + (1 - alpha) aggregate(q_w), and
    q_hat [B x K] = normalize(q_w * unfold(p_w)). The paper's Table 5 ablations:
    `scaling=False` gives p_hat = p_w, `smoothing=False` gives q_hat = q_w.
    """
    index = bank_labels.long().unsqueeze(0).expand(q_w.shape[0], -1)
    if smoothing:
        q_hat = torch.gather(p_w, 1, index)  # unfolding: p_unfold[i, j] = p_w[i, bank_labels[j]]
        q_hat.mul_(q_w)  # in place: B x K is the large tensor here (320 x 128k on ImageNet 10%)
        # guard only against 0/0: a row whose mass underflows far below 1e-12 is still normalised
        q_hat.div_(q_hat.sum(dim=1, keepdim=True).clamp_(min=torch.finfo(q_hat.dtype).tiny))
    else:
        q_hat = q_w
    if not scaling:
        return p_w, q_hat
    q_agg = torch.zeros_like(p_w).scatter_add_(1, index, q_w)  # sum of q_w per class
    p_hat = alpha * p_w + (1.0 - alpha) * q_agg
    return p_hat, q_hat


@register("simmatch")
class SimMatch(Method):
    def __init__(self, student: Network, ema_momentum: float, bank_labels: torch.Tensor,
                 num_classes: int, *, tau: float, temperature: float, alpha: float,
                 lambda_u: float, lambda_in: float, dist_align: bool = True, da_len: int = 256,
                 da: nn.Module | None = None, bank_momentum: float = 0.0,
                 propagate_after_iters: int = 0, use_bank: bool = True, teacher: str = "eman",
                 seed: int = 0, targets_from: str = "teacher", scaling: bool = True, smoothing: bool = True):
        super().__init__(student, ema_momentum, teacher, seed)
        self.targets_from = targets_from
        self.scaling, self.smoothing = scaling, smoothing  # the paper's Table 5 ablations when false
        self.tau, self.temperature, self.alpha = tau, temperature, alpha
        self.lambda_u, self.lambda_in = lambda_u, lambda_in
        self.propagate_after_iters = propagate_after_iters
        self.use_bank = use_bank
        if da is None and dist_align:
            da = DistributionAlignment(num_classes, da_len)
        self.da = da
        self.bank = None
        if use_bank:
            if student.head is None:
                raise ValueError("SimMatch needs a projection head (model.proj_dim > 0)")
            dim = student.head[-1].out_features
            self.bank = LabeledBank(len(bank_labels), dim, bank_labels, bank_momentum, seed)

    @classmethod
    def from_config(cls, cfg, params, derived, bank_labels: torch.Tensor) -> SimMatch:
        m, values = params, derived.method_values
        da = None
        if m.dist_align and m.da_target == "labeled":
            da = ReMixMatchAlignment(cfg.data.num_classes, values["remixmatch_da_len"], m.remixmatch_t)
        return cls(
            network_for(cfg, head=m.use_bank), derived.ema_momentum, bank_labels, cfg.data.num_classes,
            tau=m.tau, temperature=m.temperature, alpha=m.alpha, lambda_u=m.lambda_u,
            lambda_in=m.lambda_in if m.use_bank else 0.0, dist_align=m.dist_align, da_len=values["da_len"],
            da=da, bank_momentum=m.bank_momentum, propagate_after_iters=l_in_start(m, values),
            use_bank=m.use_bank, teacher=cls.card.teacher(cfg), seed=cfg.train.seed, targets_from=m.targets,
            scaling=m.scaling, smoothing=m.smoothing)

    @property
    def targets_in_forward(self) -> bool:
        """method.simmatch.targets=student: the targets come from the student's own forward, so
        the distribution alignment's global mean is taken there, once per process and step."""
        return self.targets_from == "student"

    @torch.no_grad()
    def targets(self, labeled: list[Batch], unlabeled: list[Batch], iteration: int) -> StepTargets:
        if self.targets_in_forward:  # made in student_losses, from the student's weak view
            return StepTargets([{} for _ in labeled])
        with self.timer("teacher_forward"):
            outs = self.teacher_forward([torch.cat([lab["x"], unl["weak"]])
                                         for lab, unl in zip(labeled, unlabeled)], iteration)
        with self.timer("targets"):
            b = labeled[0]["x"].shape[0]
            lab = merge(labeled)
            logits_u = torch.cat([lg[b:] for lg, _ in outs])
            emb = [e for _, e in outs]
            emb_u = torch.cat([e[b:] for e in emb]) if self.use_bank else None
            p_hat, q_hat = self.propagate(logits_u, emb_u, lab["y"], iteration)
            # written in after_step: this step's targets use the bank as it was
            rows = (torch.cat([e[:b] for e in emb]).float(), lab["y"].clone(), lab["index"].clone()) \
                if self.use_bank else None
            bu = unlabeled[0]["weak"].shape[0]
            return StepTargets([{"p_hat": p, "q_hat": q} for p, q in
                                zip(p_hat.split(bu), q_hat.split(bu) if q_hat is not None else [None] * len(labeled))],
                               memory=rows)

    def propagate(self, logits_u: torch.Tensor, emb_u: torch.Tensor | None, labels: torch.Tensor, iteration: int):
        """Aligned p_w and, once L_in has started, SimMatch's p_hat and q_hat (all ranks' rows)."""
        p_w = torch.softmax(logits_u.float(), dim=1)
        if self.da is not None:
            p_w = self.da(p_w, labels)
        if not (self.use_bank and iteration >= self.propagate_after_iters):
            return p_w, None
        with fp32(p_w.device):
            q_w = torch.softmax(emb_u.float() @ self.bank.features.T / self.temperature, dim=1)
            return pseudo_labels(p_w, q_w, self.bank.labels, self.alpha, self.scaling, self.smoothing)

    def student_losses(self, student, labeled: Batch, unlabeled: Batch | None, targets: Targets,
                       iteration: int) -> dict[str, torch.Tensor]:
        assert unlabeled is not None
        strong = list(unlabeled["strong"])
        if self.targets_in_forward:
            return self._losses_with_own_targets(student, labeled, unlabeled, iteration)
        with self.timer("student_forward"):
            logits, emb = student(torch.cat([labeled["x"], *strong]))
        with fp32(logits.device), self.timer("losses"):
            return self._losses(logits, emb, labeled, unlabeled, targets["p_hat"], targets["q_hat"],
                                len(strong))

    def _losses_with_own_targets(self, student, labeled: Batch, unlabeled: Batch,
                                 iteration: int) -> dict[str, torch.Tensor]:
        """One forward of labeled + weak + strong images (one BN batch); the weak view's logits and
        embeddings, detached, make the targets, and the labeled embeddings are the bank's new rows
        (`memory`, written by after_step)."""
        b, bu = labeled["x"].shape[0], unlabeled["weak"].shape[0]
        with self.timer("student_forward"):
            logits, emb = student(torch.cat([labeled["x"], unlabeled["weak"], *unlabeled["strong"]]))
        with torch.no_grad(), self.timer("targets"):
            weak_emb = emb[b:b + bu].detach() if self.use_bank else None
            p_hat, q_hat = self.propagate(logits[b:b + bu].detach(), weak_emb, labeled["y"], iteration)
            rows = (emb[:b].detach().float(), labeled["y"].clone(), labeled["index"].clone()) if self.use_bank else None
        without_weak = (torch.cat([logits[:b], logits[b + bu:]]),
                        torch.cat([emb[:b], emb[b + bu:]]) if emb is not None else None)
        with fp32(logits.device), self.timer("losses"):
            out = self._losses(*without_weak, labeled, unlabeled, p_hat, q_hat, len(unlabeled["strong"]))
            if q_hat is None and emb is not None:
                # USB's L_in before it starts is L_in x 0.0: the head gets a zero gradient, not none,
                # so weight decay and momentum act on it as in that code (its first 1,024 steps
                # leave the head's weights at ~0.86 of their size)
                out["loss"] = out["loss"] + 0.0 * emb[b + bu:].sum()
        if rows is not None:
            out["memory"] = rows
        return out

    def _losses(self, logits, emb, labeled: Batch, unlabeled: Batch, p_hat, q_hat,
                views: int) -> dict[str, torch.Tensor]:
        b, bu = labeled["x"].shape[0], unlabeled["weak"].shape[0]
        loss_x = F.cross_entropy(logits[:b].float(), labeled["y"])

        conf, pred = p_hat.max(dim=1)
        mask = (conf >= self.tau).float()
        loss_u = logits.new_zeros((), dtype=torch.float32)
        loss_in = logits.new_zeros((), dtype=torch.float32)
        for k in range(views):  # augmentation anchoring: every strong view, same target
            part = slice(b + k * bu, b + (k + 1) * bu)
            loss_u = loss_u + (soft_cross_entropy(p_hat, logits[part]) * mask).mean()
            if q_hat is not None:
                sim = emb[part].float() @ self.bank.features.T / self.temperature
                loss_in = loss_in + soft_cross_entropy(q_hat, sim).mean()
        loss_u, loss_in = loss_u / views, loss_in / views
        loss = loss_x + self.lambda_u * loss_u
        if q_hat is not None:
            loss = loss + self.lambda_in * loss_in
        # Before L_in starts the head is in no loss: its gradient stays None (DDP, built with
        # find_unused_parameters=True, leaves a parameter unused on every rank so), and SGD skips
        # it, weight decay and momentum included, as in the authors' code.

        return {
            "loss": loss,
            "loss_x": loss_x.detach(),
            "loss_u": loss_u.detach(),
            "loss_in": loss_in.detach(),
            **pseudo_label_metrics(pred, mask, unlabeled["y"]),
        }

    @torch.no_grad()
    def after_step(self, step: StepTargets) -> None:
        super().after_step(step)
        if step.memory is not None:
            with self.timer("bank_update"):
                self.bank.update(*step.memory)
