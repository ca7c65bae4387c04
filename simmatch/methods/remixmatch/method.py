"""ReMixMatch (Berthelot et al., ICLR 2020), as its official code trains it (google-research/remixmatch:
remixmatch_no_cta.py with cta/cta_remixmatch.py's `redux='1st'`, libml/layers.py, cta/lib/train.py).

Per rank and step, with b labeled images and b unlabeled ones, each with a weak view and K strong views:
- CTAugment (`augment_views`): the labeled image gets a policy drawn from the learned rates, and a
  probe copy one with uniform magnitudes; every strong view a policy of its own.
- The guess: the student (train mode, the weak batch's own BN statistics) on the weak view, aligned to
  the labeled-label marginal (ReMixMatchAlignment: DA over a 128-batch FIFO) and sharpened with T.
- MixUp over the pool labeled + weak + K strong views (labels: one-hot, and the guess for every view),
  lambda = max(l, 1 - l), l ~ Beta(alpha, alpha), partners a random permutation of the pool; the
  mixed pool forwarded in K + 2 batches of b, interleaved (`interleave`) so that each BN batch holds
  labeled and unlabeled rows, as its code forwards them.
- Losses: soft cross-entropy of the mixed labeled rows; lambda_u x that of the mixed unlabeled rows;
  lambda_u1 x that of the guess on the first strong view before MixUp; lambda_rot x the 4-way rotation
  loss of the first strong view rotated by quarters; lambda_u and lambda_u1 ramped up linearly.
- After the optimizer step: the EMA, then CTAugment's rates from the EMA's accuracy on the probes
  (every rank's, in rank order).

BN running statistics move in the last interleaved forward only (its code's UPDATE_OPS); the other
forwards of the step leave them (`still_bn`). The step's random draws are a function of (train.seed,
global rank, iteration): the same on any number of processes, and on a resume.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from simmatch import distributed as dist
from simmatch.errors import ConfigError
from simmatch.methods.alignment import ReMixMatchAlignment
from simmatch.methods.base import Batch, Method, StepTargets, Targets
from simmatch.methods.card import register
from simmatch.methods.losses import fp32, pseudo_label_metrics, soft_cross_entropy
from simmatch.methods.remixmatch.ctaugment import CTAugment, probe_accuracy
from simmatch.models import Network
from simmatch.models.network import build_backbone

CTA_LABELED, CTA_UNLABELED, MIXUP = 1, 2, 3  # what a rank's step draws, each from its own stream


def draws(seed: int, rank: int, iteration: int, purpose: int) -> np.random.Generator:
    """The generator of one rank's draws of one kind at one step."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, rank, iteration, purpose])))


@contextlib.contextmanager
def still_bn(module: nn.Module) -> Iterator[None]:
    """Train-mode forwards inside leave the BN running statistics as they are (momentum 0:
    r <- 1 r + 0 batch, exactly r; the batch counter put back), as forwards outside the update ops
    do in its TensorFlow code."""
    layers = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(layers, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def interleave_offsets(batch: int, nu: int) -> list[int]:
    """Row offsets of the nu + 1 groups a batch is cut into (the remainder to the last groups)."""
    groups = [batch // (nu + 1)] * (nu + 1)
    for x in range(batch - sum(groups)):
        groups[-x - 1] += 1
    offsets = [0]
    for g in groups:
        offsets.append(offsets[-1] + g)
    return offsets


def interleave(xy: list[torch.Tensor], batch: int) -> list[torch.Tensor]:
    """Batch i gives its group i to batch 0 and takes batch 0's: every batch then holds a group of
    each. Applied twice it is the identity (how the logits come back)."""
    nu = len(xy) - 1
    offsets = interleave_offsets(batch, nu)
    parts = [[v[offsets[p]:offsets[p + 1]] for p in range(nu + 1)] for v in xy]
    for i in range(1, nu + 1):
        parts[0][i], parts[i][i] = parts[i][i], parts[0][i]
    return [torch.cat(p) for p in parts]


def rotate_quarters(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Its code's `random_rotate` (NCHW here): quarter 0 as it is, quarter 1 turned 180 degrees,
    quarters 2 and 3 transposed then flipped vertically / horizontally (90 degrees one way and the
    other); the labels 0..3 in that order. The batch is a multiple of 4 (checked at the start)."""
    q = x.shape[0] // 4
    t = x[2 * q:].transpose(2, 3)
    rotated = torch.cat([x[:q], x[q:2 * q].flip(2, 3), t[:q].flip(2), t[q:].flip(3)])
    labels = torch.arange(4, device=x.device).repeat_interleave(q)
    return rotated, labels


class RotationNetwork(Network):
    """The network with ReMixMatch's rotation classifier on the pooled feature (its `classify_rot`:
    glorot-normal weights, zero bias). Given a list of batches it forwards each on its own (each its
    BN batch) in one call, so that DDP sees one forward whose outputs reach every parameter; only
    the last of them moves the BN running statistics."""

    def __init__(self, backbone: nn.Module, norm_feat: bool = False):
        super().__init__(backbone, proj_dim=0, norm_feat=norm_feat)
        self.rotation = nn.Linear(self.feat_dim, 4)
        nn.init.xavier_normal_(self.rotation.weight)
        nn.init.zeros_(self.rotation.bias)

    def forward(self, x, predict: bool = True, rotated: torch.Tensor | None = None):
        if isinstance(x, torch.Tensor):
            return super().forward(x, predict)
        outs = []
        with still_bn(self):
            rot = None
            if rotated is not None:
                feat = self.features(rotated)
                rot = self.rotation(self.norm(feat) if self.norm is not None else feat)
            for part in x[:-1]:
                outs.append(super().forward(part)[0])
        outs.append(super().forward(x[-1])[0])
        return outs, rot


@register("remixmatch")
class ReMixMatch(Method):
    def __init__(self, student: RotationNetwork, ema_momentum: float, num_classes: int, *, mixup_alpha: float,
                 temperature: float, lambda_u: float, lambda_u1: float, lambda_rot: float, rampup_iters: int,
                 dist_align: bool, da_len: int, cta: CTAugment | None, mean: list[float], std: list[float],
                 seed: int = 0):
        super().__init__(student, ema_momentum, "eman", seed)
        self.num_classes, self.alpha, self.temperature = num_classes, mixup_alpha, temperature
        self.lambda_u, self.lambda_u1, self.lambda_rot = lambda_u, lambda_u1, lambda_rot
        self.rampup_iters = rampup_iters
        self.align = ReMixMatchAlignment(num_classes, da_len, temperature) if dist_align else None
        self.cta = cta
        self.mean, self.std = list(mean), list(std)

    @classmethod
    def from_config(cls, cfg, params, derived, bank_labels: torch.Tensor) -> ReMixMatch:
        m, values = params, derived.method_values
        if m.lambda_rot > 0 and derived.batch_per_rank % 4:
            raise ConfigError(f"method.remixmatch.lambda_rot={m.lambda_rot:g} rotates each quarter of a rank's "
                              f"strong views by another angle: the per-rank batch ({derived.batch_per_rank}) must be "
                              f"a multiple of 4 (train.batch_size over the ranks)")
        student = RotationNetwork(build_backbone(cfg.model.arch, cfg.data.num_classes, cfg.model.small_input),
                                  cfg.model.norm_feat)
        cta = CTAugment(m.cta_depth, m.cta_threshold, m.cta_decay) if m.ctaugment else None
        return cls(student, derived.ema_momentum, cfg.data.num_classes, mixup_alpha=m.mixup_alpha,
                   temperature=m.temperature, lambda_u=m.lambda_u, lambda_u1=m.lambda_u1,
                   lambda_rot=m.lambda_rot, rampup_iters=values["rampup_iters"], dist_align=m.dist_align,
                   da_len=values["da_len"], cta=cta, mean=cfg.data.mean, std=cfg.data.std, seed=cfg.train.seed)

    def augment_views(self, labeled: list[Batch], unlabeled: list[Batch], ranks: list[int],
                      iteration: int) -> tuple[list[Batch], list[Batch]]:
        """CTAugment's policies on each rank's labeled images (and their probes) and strong views,
        and the rank's MixUp draws (`mix_lam`, `mix_index`, `rank`)."""
        out_l, out_u = [], []
        for rank, lab, unl in zip(ranks, labeled, unlabeled):
            lab, unl = dict(lab), dict(unl)
            if self.cta is not None:
                with self.timer("ctaugment"):
                    lab["x"], lab["probe"], lab["policy"] = self.cta.augment_labeled(
                        lab["x"], self.mean, self.std, draws(self.seed, rank, iteration, CTA_LABELED))
                    gen = draws(self.seed, rank, iteration, CTA_UNLABELED)
                    unl["strong"] = [self.cta.augment_batch(v, self.mean, self.std, gen)[0] for v in unl["strong"]]
            n = lab["x"].shape[0] * (len(unl["strong"]) + 2)
            gen = draws(self.seed, rank, iteration, MIXUP)
            beta = torch.from_numpy(gen.beta(self.alpha, self.alpha, n).astype(np.float32))
            unl["mix_lam"] = torch.maximum(beta, 1.0 - beta).to(lab["x"].device)
            unl["mix_index"] = torch.from_numpy(gen.permutation(n)).to(lab["x"].device)
            unl["rank"] = torch.tensor([rank], device=lab["x"].device)
            out_l.append(lab)
            out_u.append(unl)
        return out_l, out_u

    @torch.no_grad()
    def targets(self, labeled: list[Batch], unlabeled: list[Batch], iteration: int) -> StepTargets:
        """The guess of every rank (its weak view through the student in train mode, a BN group's ranks
        in one forward; DA's means are global) and the EMA's accuracy on the CTAugment probes."""
        k = self.ranks_per_forward
        with self.timer("guess"), still_bn(self.student):
            logits = [self.student(torch.cat([u["weak"] for u in unlabeled[i:i + k]]))[0]
                      for i in range(0, len(unlabeled), k)]
        with self.timer("targets"), fp32(labeled[0]["x"].device):
            probs = torch.softmax(torch.cat(logits).float(), dim=1)
            labels = torch.cat([lab["y"] for lab in labeled])
            guess = self.align(probs, labels) if self.align is not None else sharpen(probs, self.temperature)
            b = labeled[0]["x"].shape[0]
            ranks: list[Targets] = [{"guess": g} for g in guess.split(b)]
            memory = None
            if self.cta is not None:
                probe = torch.cat([lab["probe"] for lab in labeled])
                accuracy = probe_accuracy(torch.softmax(self.teacher(probe)[0].float(), dim=1), labels)
                memory = (torch.cat([lab["policy"] for lab in labeled]).to(accuracy.device), accuracy)
                for r, acc in zip(ranks, accuracy.split(b)):
                    r["probe_accuracy"] = acc
        return StepTargets(ranks, memory=memory)

    def student_losses(self, student, labeled: Batch, unlabeled: Batch | None, targets: Targets,
                       iteration: int) -> dict[str, torch.Tensor]:
        """One rank's step, or a BN group's ranks' (each mixed within itself, their batches forwarded
        together slot by slot)."""
        assert unlabeled is not None
        ranks = unlabeled["rank"].numel()
        b = labeled["x"].shape[0] // ranks
        strong = list(unlabeled["strong"])
        guess = targets["guess"]
        onehot = F.one_hot(labeled["y"], self.num_classes).float()
        slots: list[list[torch.Tensor]] = [[] for _ in range(len(strong) + 2)]
        mixed_labels, rotated, rot_labels = [], [], []
        with self.timer("mixup"):
            for r in range(ranks):
                rows = slice(r * b, (r + 1) * b)
                pool = torch.cat([labeled["x"][rows], unlabeled["weak"][rows], *[v[rows] for v in strong]])
                q = guess[rows].float()
                pool_labels = torch.cat([onehot[rows]] + [q] * (len(strong) + 1))
                n = pool.shape[0]
                lam = unlabeled["mix_lam"][r * n:(r + 1) * n]
                index = unlabeled["mix_index"][r * n:(r + 1) * n]
                lam_x = lam.to(pool.dtype).view(-1, 1, 1, 1)
                mixed = lam_x * pool + (1 - lam_x) * pool[index]
                mixed_labels.append(lam.view(-1, 1) * pool_labels + (1 - lam.view(-1, 1)) * pool_labels[index])
                for slot, part in zip(slots, interleave(list(mixed.split(b)), b)):
                    slot.append(part)
                rot, rot_y = rotate_quarters(strong[0][rows])
                rotated.append(rot)
                rot_labels.append(rot_y)
        with self.timer("student_forward"):
            outs, rot_logits = student([strong[0]] + [torch.cat(s) for s in slots],
                                       rotated=torch.cat(rotated) if self.lambda_rot > 0 else None)
        with fp32(labeled["x"].device), self.timer("losses"):
            first = outs[0]
            per_rank = [[o[r * b:(r + 1) * b] for o in outs[1:]] for r in range(ranks)]
            back = [interleave(p, b) for p in per_rank]  # each rank's logits in pool order
            logits_x = torch.cat([p[0] for p in back]).float()
            logits_u = torch.cat([torch.cat(p[1:]) for p in back]).float()
            labels_x = torch.cat([m[:b] for m in mixed_labels])
            labels_u = torch.cat([m[b:] for m in mixed_labels])
            loss_x = soft_cross_entropy(labels_x, logits_x).mean()
            loss_u = soft_cross_entropy(labels_u, logits_u).mean()
            loss_u1 = soft_cross_entropy(guess.float(), first.float()).mean()
            loss_rot = (F.cross_entropy(rot_logits.float(), torch.cat(rot_labels)) if rot_logits is not None
                        else first.new_zeros((), dtype=torch.float32))
            ramp = min(1.0, iteration / self.rampup_iters) if self.rampup_iters > 0 else 1.0
            loss = (loss_x + self.lambda_u1 * ramp * loss_u1 + self.lambda_u * ramp * loss_u
                    + self.lambda_rot * loss_rot)
            pred = guess.argmax(dim=1)
            out = {"loss": loss, "loss_x": loss_x.detach(), "loss_u": loss_u.detach(), "loss_u1": loss_u1.detach(),
                   "loss_rot": loss_rot.detach(), "ramp": torch.tensor(ramp, device=loss.device),
                   **pseudo_label_metrics(pred, torch.ones_like(pred, dtype=torch.float32), unlabeled["y"])}
            if "probe_accuracy" in targets:
                out["probe_accuracy"] = targets["probe_accuracy"].mean()
            return out

    @torch.no_grad()
    def after_step(self, step: StepTargets) -> None:
        super().after_step(step)
        if self.cta is not None and step.memory is not None:
            policy, accuracy = step.memory
            with self.timer("ctaugment_update"):
                self.cta.update(dist.all_gather_cat(policy.contiguous()).cpu(),
                                dist.all_gather_cat(accuracy.contiguous()).cpu())


def sharpen(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """p ** (1 / T), renormalised (the guess without distribution alignment, its use_dm=false)."""
    p = probs.pow(1.0 / temperature)
    return p / p.sum(dim=1, keepdim=True)
