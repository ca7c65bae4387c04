"""SimMatchV2 (ICCV 2023): graph pseudo-labels over the labeled bank, and consistency of the
student's relations to an unlabeled bank (node-node, edge-edge, node-edge), as the authors'
code trains it (github mingkai-zheng/SimMatchV2, models/simmatchv2.py and main.py).

Per step, from the teacher's weak view (aligned by a running-mean DA) and its top-n labeled
neighbours, the pseudo-label is the first row of (1 - alpha)(I - alpha A)^-1 applied to the
nodes' labels (A: row softmax of the nodes' similarities / t, no self loops). Losses: the
labeled cross-entropy; nn: the pseudo-label on every strong view, masked where the ALIGNED
teacher probability reaches tau (the authors' mask); ee: the teacher's relation to the
unlabeled bank as target of each strong view's; ne: the aligned probability as target of each
strong view's relation carried to class space through the bank's probabilities. A term that
is not finite in the authors' arithmetic (log of 0) is zeroed for the step, as they do, and
counted (`nonfinite_ee`, `nonfinite_ne`). Targets in fp32 under no_grad.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from simmatch import distributed as dist
from simmatch.methods.alignment import resize_fifo
from simmatch.methods.bank import LabeledBank
from simmatch.methods.base import Batch, Method, StepTargets, Targets, merge
from simmatch.methods.card import register
from simmatch.methods.losses import fp32, pseudo_label_metrics, soft_cross_entropy
from simmatch.models import Network, network_for


def graph_pseudo_labels(z: torch.Tensor, p: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
                        num_classes: int, topn: int, t: float, alpha: float) -> torch.Tensor:
    """z [B x D] weak embeddings, p [B x C] their aligned probabilities, bank [K x D] labeled
    embeddings with classes `bank_labels` [K]. Per sample a graph of itself and its `topn`
    nearest bank rows; returns [B x C], row 0 of (1 - alpha)(I - alpha A)^-1 times the nodes'
    label rows (p, then one-hot), solved rather than inverted."""
    near = (z @ bank.T).topk(topn, dim=1).indices  # [B x n]
    nodes = torch.cat([z[:, None], bank[near]], dim=1)  # [B x (n+1) x D]
    rows = torch.cat([p[:, None], F.one_hot(bank_labels[near], num_classes).to(p.dtype)], dim=1)
    sim = nodes @ nodes.transpose(1, 2) / t
    eye = torch.eye(topn + 1, dtype=sim.dtype, device=sim.device)
    adjacency = torch.softmax(sim.masked_fill(eye.bool(), float("-inf")), dim=-1)
    # row 0 of M^-1 is the solution r of M^T r = e_0, M = I - alpha A
    e0 = eye[:, :1].expand(z.shape[0], -1, -1)
    first = torch.linalg.solve((eye - alpha * adjacency).transpose(1, 2), e0)[..., 0]  # [B x (n+1)]
    return (1.0 - alpha) * (first[:, None] @ rows)[:, 0]


class UnlabeledBank(nn.Module):
    """A ring of teacher embeddings [K x D] and their aligned class probabilities [K x C],
    written after each step with every rank's rows (all-gathered, rank order). The embeddings
    start as random unit vectors and the probabilities at zero, as in the authors' code.
    Loaded at another K (the global batch changed), it keeps its newest entries."""

    def __init__(self, size: int, dim: int, num_classes: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed + 1)  # not the labeled bank's draw
        self.register_buffer("features", F.normalize(torch.randn(size, dim, generator=gen), dim=1))
        self.register_buffer("probs", torch.zeros(size, num_classes))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "features"
        if key in state_dict and state_dict[key].shape[0] != self.features.shape[0]:
            ptr, count = int(state_dict[prefix + "ptr"]), int(state_dict[prefix + "count"])
            for name in ("features", "probs"):
                rows, new_ptr, new_count = resize_fifo(state_dict[prefix + name].cpu(), ptr, count,
                                                       self.features.shape[0])
                state_dict[prefix + name] = rows
            state_dict[prefix + "ptr"], state_dict[prefix + "count"] = torch.tensor(new_ptr), torch.tensor(new_count)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def update(self, features: torch.Tensor, probs: torch.Tensor) -> None:
        features, probs = dist.all_gather_cat(features.float()), dist.all_gather_cat(probs.float())
        size = self.features.shape[0]
        index = (self.ptr + torch.arange(features.shape[0], device=self.ptr.device)) % size
        self.features.index_copy_(0, index, features)
        self.probs.index_copy_(0, index, probs)
        self.ptr.copy_((self.ptr + features.shape[0]) % size)
        self.count.copy_(torch.clamp(self.count + features.shape[0], max=size))


class MomentumAlignment(nn.Module):
    """SimMatchV2's DA: p <- normalize(p / m_p), m_p a running mean (momentum) of the global
    batch mean of p, updated after use and starting uniform (so the first step is the identity)."""

    def __init__(self, num_classes: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.full((num_classes,), 1.0 / num_classes))

    @torch.no_grad()
    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        probs = probs.float()
        aligned = probs / self.mean
        aligned = aligned / aligned.sum(dim=1, keepdim=True)
        self.mean.mul_(self.momentum).add_(dist.all_reduce_mean(probs.mean(dim=0)), alpha=1.0 - self.momentum)
        return aligned


@register("simmatchv2")
class SimMatchV2(Method):
    def __init__(self, student: Network, ema_momentum: float, bank_labels: torch.Tensor, num_classes: int,
                 unlabeled_bank: int, *, tau: float, temperature: float, alpha: float, topn: int,
                 da_momentum: float, lambda_nn: float, lambda_ee: float, lambda_ne: float,
                 teacher: str = "ema_shuffle_bn", seed: int = 0):
        super().__init__(student, ema_momentum, teacher, seed)
        if student.head is None:
            raise ValueError("SimMatchV2 needs a projection head (model.proj_dim > 0)")
        dim = student.head[-1].out_features
        self.num_classes, self.tau, self.temperature, self.alpha = num_classes, tau, temperature, alpha
        self.topn = min(topn, len(bank_labels))
        self.lambda_nn, self.lambda_ee, self.lambda_ne = lambda_nn, lambda_ee, lambda_ne
        self.da = MomentumAlignment(num_classes, da_momentum)
        self.bank = LabeledBank(len(bank_labels), dim, bank_labels, 0.0, seed)
        self.unlabeled = UnlabeledBank(unlabeled_bank, dim, num_classes, seed)

    @classmethod
    def from_config(cls, cfg, params, derived, bank_labels: torch.Tensor) -> SimMatchV2:
        m, values = params, derived.method_values
        return cls(network_for(cfg), derived.ema_momentum, bank_labels, cfg.data.num_classes,
                   values["k"], tau=m.tau, temperature=m.temperature, alpha=m.alpha,
                   topn=m.topn, da_momentum=values["da_momentum"], lambda_nn=m.lambda_nn,
                   lambda_ee=m.lambda_ee, lambda_ne=m.lambda_ne, teacher=cls.card.teacher(cfg),
                   seed=cfg.train.seed)

    @torch.no_grad()
    def targets(self, labeled: list[Batch], unlabeled: list[Batch], iteration: int) -> StepTargets:
        with self.timer("teacher_forward"):
            outs = self.teacher_forward([torch.cat([lab["x"], unl["weak"]])
                                         for lab, unl in zip(labeled, unlabeled)], iteration)
        with self.timer("targets"), fp32(labeled[0]["x"].device):
            b = labeled[0]["x"].shape[0]
            lab = merge(labeled)
            z_w = torch.cat([e[b:] for _, e in outs]).float()
            p = self.da(torch.softmax(torch.cat([lg[b:] for lg, _ in outs]).float(), dim=1))
            relation = torch.softmax(z_w @ self.unlabeled.features.T / self.temperature, dim=1)
            y = graph_pseudo_labels(z_w, p, self.bank.features, self.bank.labels, self.num_classes,
                                    self.topn, self.temperature, self.alpha)
            rows = (torch.cat([e[:b] for _, e in outs]).float(), lab["y"].clone(), lab["index"].clone(), z_w, p)
            bu = unlabeled[0]["weak"].shape[0]
            return StepTargets([{"p": pi, "pseudo": yi, "relation": ri}
                                for pi, yi, ri in zip(p.split(bu), y.split(bu), relation.split(bu))], memory=rows)

    def student_losses(self, student, labeled: Batch, unlabeled: Batch | None, targets: Targets,
                       iteration: int) -> dict[str, torch.Tensor]:
        assert unlabeled is not None
        b, strong = labeled["x"].shape[0], list(unlabeled["strong"])
        with self.timer("student_forward"):  # the authors' BN batches: cat(labeled, view 0), then each view
            logits, emb = student(torch.cat([labeled["x"], strong[0]]))
            views = [(logits[b:], emb[b:])] + [student(v) for v in strong[1:]]
        with fp32(logits.device), self.timer("losses"):
            p, pseudo, relation = targets["p"], targets["pseudo"], targets["relation"]
            conf, pred = p.max(dim=1)
            mask = (conf >= self.tau).float()
            loss_x = F.cross_entropy(logits[:b].float(), labeled["y"])
            loss_nn = loss_ee = loss_ne = logits.new_zeros((), dtype=torch.float32)
            bad_ee = bad_ne = torch.zeros((), dtype=torch.bool, device=logits.device)
            for view_logits, view_emb in views:
                loss_nn = loss_nn + (soft_cross_entropy(pseudo, view_logits) * mask).mean()
                sim = view_emb.float() @ self.unlabeled.features.T / self.temperature
                rel_q = torch.softmax(sim, dim=1)
                loss_ee = loss_ee + soft_cross_entropy(relation, sim).mean()
                mass = rel_q @ self.unlabeled.probs
                # their log(softmax) and log(mass): -inf (or 0 * -inf) where these underflow to 0
                bad_ee = bad_ee | (rel_q == 0).any()
                bad_ne = bad_ne | (mass == 0).any()
                loss_ne = loss_ne - (p * torch.log(torch.where(mass > 0, mass, 1.0))).sum(dim=1).mean()
            n = len(views)
            loss_nn, loss_ee, loss_ne = loss_nn / n, loss_ee / n, loss_ne / n
            bad_ee, bad_ne = bad_ee | ~torch.isfinite(loss_ee), bad_ne | ~torch.isfinite(loss_ne)
            loss_ee = torch.where(bad_ee, 0.0, loss_ee)  # finite both ways: a zero gradient when dropped
            loss_ne = torch.where(bad_ne, 0.0, loss_ne)
            loss = loss_x + self.lambda_nn * loss_nn + self.lambda_ee * loss_ee + self.lambda_ne * loss_ne
            return {"loss": loss, "loss_x": loss_x.detach(), "loss_nn": loss_nn.detach(),
                    "loss_ee": loss_ee.detach(), "loss_ne": loss_ne.detach(),
                    "nonfinite_ee": bad_ee.float(), "nonfinite_ne": bad_ne.float(),
                    **pseudo_label_metrics(pred, mask, unlabeled["y"])}

    @torch.no_grad()
    def after_step(self, step: StepTargets) -> None:
        super().after_step(step)
        emb_l, y, index, z_w, p = step.memory
        with self.timer("bank_update"):
            self.bank.update(emb_l, y, index)
            self.unlabeled.update(z_w, p)
