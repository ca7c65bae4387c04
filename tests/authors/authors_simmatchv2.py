"""The SimMatchV2 authors' training step, transcribed for tests (ICCV 2023, Zheng et al.).

Source: github mingkai-zheng/SimMatchV2, read at commit f0e054c030ded22877f38362653d0f3b0f2aa073
(every code file is unchanged since the first commit 6cd361302fe3adb084c86c26e9005553109d3a48;
later commits touch README.md only). What each piece here transcribes:

- `Trunk` (and the distributed helpers): tests/authors/authors_simmatch.py's, because SimMatchV2's
  backbone/resnet.py `ResNet` is SimMatch's (torchvision's layers and init, no `fc`, forward to
  the flattened pool, `out_channels`).
- `Net`: models/simmatchv2.py `ResNet` (l. 8-32): pooled feature -> LayerNorm(c) if --norm_feat
  (l. 21-24) -> `fc` Linear(c, classes) and `head` Linear(c, c) - ReLU - Linear(c, dim), the
  embedding L2-normalised; c = 2048 for their ResNet-50, dim = 128 (the constructor default).
- `SimMatchV2`: models/simmatchv2.py `SimMatchV2` with eman=False, --DA (l. 35-248): `__init__`
  (banks, pointer, DA state), `momentum_update_ema`, `distribution_alignment`,
  `_update_unlabel_bank`, `_update_label_bank`, `_batch_shuffle_ddp`, `_batch_unshuffle_ddp`,
  `forward`; its graph (l. 203-213) is `graph_pseudo_label`, its losses (l. 226-242) `relation_losses`.
- `Authors`: main.py `main_worker` (DDP without find_unused_parameters, SGD over every parameter,
  GradScaler) and `train` (l. 270-372: warm-up call, mask, losses, step, EMA momentum, EMA update);
  `warmup_learning_rate`, `adjust_learning_rate`: utils/lr_schedule.py with --cos;
  `bank_size` main.py l. 191; `unlabeled_steps` the DistributedSampler + drop_last loader (l. 163-167).

Their files carry a non-commercial licence (CC-BY-NC-4.0): this is the maths written anew.
Inputs that stand in for what their code draws itself: the shuffle-BN permutation (theirs:
torch.randperm on every rank, rank 0's broadcast; here optional, drawn the same way when None) and
the batches. Their code requires torch.distributed; here one process is a world of one.

Unusual in their code, or looking like a fault (what it does):
1. The confidence mask is max(DA'd teacher probability) >= 0.7 (main.py l. 341-342), not the
   max of the graph pseudo-label that nn trains towards.
2. `u_labels` starts at zeros (`torch.zeros(K, C) / C`, l. 68; uniform was perhaps meant): at the
   first step relation @ u_labels is 0, log gives -inf, loss_ne is inf and is zeroed; until the
   ring is full (k = 256 steps) the relation mass on unwritten slots (random unit vectors, l. 64-65)
   carries no class mass, so nn_qu sums to less than 1 and ne gets an extra -log(written mass).
3. Non-finite ee / ne (the view-averaged scalar, l. 238-242) become torch.zeros(1): one bad row
   zeroes the whole term for every view; the loss then has shape [1]; `if` on a tensor syncs the host.
4. log(softmax) for ee and log(relation @ u_labels) for ne, not log_softmax. Under --fp16 the
   matmuls (similarities, relation @ u_labels) run in half precision: the latter can underflow to 0
   (then ne is zeroed); softmax runs in fp32, and `A - 1e9 * eye` is promoted to fp32 by the fp32 eye.
5. DA divides by the running mean BEFORE updating it (l. 92-97); the mean starts uniform, so
   step 0 is the identity; momentum 0.9 over the global batch mean of the raw probabilities.
6. The graph: node 0 the weak teacher embedding, nodes 1..n its top-n labeled-bank neighbours;
   A = row softmax of (cosine similarity / t) with the diagonal set to -1e9 (no self loops, so A is
   row-stochastic, not symmetric); labels: node 0 the DA'd probability, the others one-hot;
   pseudo-label = first row of (1 - alpha)(I - alpha A)^-1 times the labels (torch.inverse, per
   sample [n+1, n+1]). With alpha = 0.1 about 90% of it is the teacher's own DA'd probability.
7. `l_labels` are the true labels from the start (one-hot, never rewritten); `l_bank` starts as
   random unit vectors and is overwritten row by row by the teacher's labeled embeddings.
8. Banks, DA state and the EMA's BN buffers are buffers of the DDP module (broadcast_buffers=True):
   rank 0's are re-broadcast at every forward, one-hot labels included (10%: 128,116 x 1000 fp32).
9. The EMA averages parameters only; the teacher runs in train mode with shuffle-BN (its BN buffers
   are its own running statistics, never used). ema_m > 0.996 is constant; below, a cosine ramp to 1.
10. Student forwards: cat(labeled, strong view 0) is one BN batch, each further crop its own.
11. If ee and ne were both zeroed in one step, the head would get no gradient and DDP (no
   find_unused_parameters) would fail at the next step.
12. On a GradScaler-skipped step (inf gradients) the EMA, bank and DA updates still happen.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F
from authors_simmatch import (  # the same helpers, network and lr schedule as SimMatch's code
    ResNet,
    adjust_learning_rate,
    concat_all_gather,
    rank,
    warmup_learning_rate,
    world,
)

# script/train.sh and main.py's argparse defaults (batch_size per GPU, mu, threshold, ema_m, wd, momentum)
RECIPE_1P = {"lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True, "epochs": 300, "warmup_epoch": 5,
             "cos": True, "batch_size": 8, "mu": 5, "threshold": 0.7, "ema_m": 0.999, "eman": False,
             "norm_feat": True, "multicrop": True, "alpha": 0.1, "topn": 128, "k": 256, "t": 0.1, "DA": True,
             "da_m": 0.9, "lambda_nn": 10.0, "lambda_ee": 10.0, "lambda_ne": 10.0, "fp16": True, "dim": 128}
RECIPE_10P = {**RECIPE_1P, "lambda_ee": 5.0, "lambda_ne": 5.0}
FILL = 1e9  # the diagonal's penalty in the graph (l. 210)


def bank_size(k: int, batch_size: int, mu: int, world_size: int) -> int:
    """main.py l. 191: K = k x the global unlabeled batch (256 x 8 x 5 x 8 = 81,920)."""
    return k * batch_size * mu * world_size


def unlabeled_steps(num_unlabeled: int, world_size: int, batch_size: int, mu: int) -> int:
    """len(train_loader_u): DistributedSampler pads to ceil(N / W) per rank, drop_last batches."""
    return math.ceil(num_unlabeled / world_size) // (batch_size * mu)


def ema_momentum(ema_m: float, curr_step: int, total_step: int) -> float:
    """main.py l. 360: constant above 0.996, else ramped from ema_m to 1 by a half cosine."""
    if ema_m > 0.996:
        return ema_m
    return 1 - (1 - ema_m) * (math.cos(math.pi * curr_step / float(total_step)) + 1) / 2


class Net(ResNet):
    """models/simmatchv2.py `ResNet`: SimMatch's (fc and head side by side on the pooled feature),
    the feature first layer-normalised with --norm_feat."""

    def __init__(self, make_trunk, num_classes: int, dim: int, norm_feat: bool):
        super().__init__(make_trunk, num_classes, dim)
        self.norm = nn.LayerNorm(self.fc.in_features) if norm_feat else nn.Identity()

    def forward(self, x):
        h = self.norm(self.backbone(x))
        return self.fc(h), F.normalize(self.head(h))


def graph_pseudo_label(feat_ku, prob_ku, l_bank, l_labels, topn: int, t: float, alpha: float):
    """l. 203-213: the weak embedding and its top-n labeled neighbours as one graph per sample;
    the first row of (1 - alpha)(I - alpha A)^-1 applied to the nodes' label rows."""
    n_u = feat_ku.shape[0]
    near = torch.topk(feat_ku @ l_bank.T, k=topn, dim=-1, largest=True, sorted=False).indices.flatten()
    nodes = torch.cat([feat_ku[:, None], l_bank[near].reshape(n_u, topn, -1)], dim=1)
    rows = torch.cat([prob_ku[:, None], l_labels[near].reshape(n_u, topn, -1)], dim=1)
    eye = torch.eye(topn + 1, device=feat_ku.device)
    adjacency = F.softmax(nodes @ nodes.transpose(-2, -1) / t - eye * FILL, dim=-1)
    propagation = (1 - alpha) * torch.inverse(eye - alpha * adjacency)
    return (propagation @ rows)[:, 0]


def relation_losses(feat_views, relation_ku, prob_ku, u_bank, u_labels, t: float, device):
    """l. 226-242: ee and ne summed over the strong views, divided by their number; a non-finite
    total becomes torch.zeros(1)."""
    ee, ne = 0, 0
    for feat in feat_views:
        relation_qu = F.softmax(feat @ u_bank.T / t, dim=1)
        ee = ee + torch.sum(-relation_qu.log() * relation_ku.detach(), dim=1).mean()
        ne = ne + torch.sum(-(relation_qu @ u_labels).log() * prob_ku.detach(), dim=1).mean()
    ee, ne = ee / len(feat_views), ne / len(feat_views)
    if torch.isnan(ee) or torch.isinf(ee):
        ee = torch.zeros(1, device=device)
    if torch.isnan(ne) or torch.isinf(ne):
        ne = torch.zeros(1, device=device)
    return ee, ne


class SimMatchV2(nn.Module):
    def __init__(self, make_trunk, num_classes: int, label_bank: torch.Tensor, K: int, hp: dict = RECIPE_1P):
        super().__init__()
        self.hp, self.eman, self.num_classes, self.K = hp, hp["eman"], num_classes, K
        self.main = Net(make_trunk, num_classes, hp["dim"], hp["norm_feat"])
        self.ema = Net(make_trunk, num_classes, hp["dim"], hp["norm_feat"])
        for p_main, p_ema in zip(self.main.parameters(), self.ema.parameters()):
            p_ema.data.copy_(p_main.data)
            p_ema.requires_grad = False
        self.register_buffer("l_bank", F.normalize(torch.randn(label_bank.numel(), hp["dim"])))
        self.register_buffer("l_labels", F.one_hot(label_bank.long(), num_classes).float())
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("u_bank", F.normalize(torch.randn(K, hp["dim"])))
        self.register_buffer("u_labels", torch.zeros(K, num_classes))  # zeros (docstring, 2)
        self.register_buffer("da", torch.full((1, num_classes), 1.0 / num_classes))
        self.seen: dict = {}  # this step's targets, kept for comparisons

    @torch.no_grad()
    def momentum_update_ema(self, m: float) -> None:
        if not self.eman:
            for p_main, p_ema in zip(self.main.parameters(), self.ema.parameters()):
                p_ema.data = p_ema.data * m + p_main.data * (1.0 - m)
            return
        for (name, v_main), (name_ema, v_ema) in zip(self.main.state_dict().items(), self.ema.state_dict().items()):
            assert name == name_ema and v_main.shape == v_ema.shape
            v_ema.copy_(v_main if "num_batches_tracked" in name else v_ema * m + (1.0 - m) * v_main)

    @torch.no_grad()
    def distribution_alignment(self, probs: torch.Tensor) -> torch.Tensor:
        aligned = probs / self.da
        aligned = aligned / aligned.sum(dim=1, keepdim=True)
        total = probs.sum(dim=0, keepdim=True)
        if world() > 1:
            tdist.all_reduce(total)
        batch_mean = total / (probs.shape[0] * world())
        self.da = self.da * self.hp["da_m"] + batch_mean * (1 - self.hp["da_m"])
        return aligned.detach()

    @torch.no_grad()
    def write_unlabeled(self, feat: torch.Tensor, prob: torch.Tensor) -> None:
        feat, prob = concat_all_gather(feat), concat_all_gather(prob)
        n, start = feat.shape[0], int(self.ptr[0])
        assert self.K % n == 0
        self.u_bank[start:start + n] = feat
        self.u_labels[start:start + n] = prob
        self.ptr[0] = (start + n) % self.K

    @torch.no_grad()
    def write_labeled(self, feat: torch.Tensor, index: torch.Tensor) -> None:
        self.l_bank[concat_all_gather(index)] = concat_all_gather(feat)

    @torch.no_grad()
    def shuffle(self, x: torch.Tensor, idx_shuffle: torch.Tensor | None):
        gathered = concat_all_gather(x)
        if idx_shuffle is None:
            idx_shuffle = torch.randperm(gathered.shape[0], device=x.device)
        if world() > 1:
            tdist.broadcast(idx_shuffle, src=0)
        mine = idx_shuffle.view(gathered.shape[0] // x.shape[0], -1)[rank()]
        return gathered[mine], torch.argsort(idx_shuffle)

    @torch.no_grad()
    def unshuffle(self, x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
        gathered = concat_all_gather(x)
        return gathered[idx_unshuffle.view(gathered.shape[0] // x.shape[0], -1)[rank()]]

    def forward(self, im_x, im_u_w=None, im_u_s=None, index=None, idx_shuffle=None):
        if im_u_w is None and im_u_s is None:
            return self.main(im_x)[0]  # validation: the student
        hp, device = self.hp, im_x.device
        l_bank, l_labels = self.l_bank.clone().detach(), self.l_labels.clone().detach()
        u_bank, u_labels = self.u_bank.clone().detach(), self.u_labels.clone().detach()
        n_x = im_x.shape[0]
        with torch.no_grad():
            im = torch.cat([im_x, im_u_w])
            if self.eman:
                logits_k, feat_k = self.ema(im)
            else:
                im, idx_unshuffle = self.shuffle(im, idx_shuffle)
                logits_k, feat_k = self.ema(im)
                logits_k, feat_k = self.unshuffle(logits_k, idx_unshuffle), self.unshuffle(feat_k, idx_unshuffle)
            feat_kx, feat_ku = feat_k[:n_x], feat_k[n_x:]
            prob_ku = F.softmax(logits_k[n_x:], dim=1)
            if hp["DA"]:
                prob_ku = self.distribution_alignment(prob_ku)
            relation_ku = F.softmax(feat_ku @ u_bank.T / hp["t"], dim=-1)
            pseudo_label = graph_pseudo_label(feat_ku, prob_ku, l_bank, l_labels, hp["topn"], hp["t"], hp["alpha"])

        logits_q, feat_q = self.main(torch.cat([im_x, im_u_s[0]]))
        logits_qx = logits_q[:n_x]
        logits_views, feat_views = [logits_q[n_x:]], [feat_q[n_x:]]
        for im_q in im_u_s[1:]:
            logits_v, feat_v = self.main(im_q)
            logits_views.append(logits_v)
            feat_views.append(feat_v)
        loss_ee, loss_ne = relation_losses(feat_views, relation_ku, prob_ku, u_bank, u_labels, hp["t"], device)

        self.write_labeled(feat_kx, index)
        self.write_unlabeled(feat_ku, prob_ku)
        self.seen = {"prob_ku": prob_ku, "pseudo_label": pseudo_label, "relation_ku": relation_ku}
        views = len(im_u_s)
        return (logits_qx, torch.cat(logits_views), loss_ee, loss_ne, prob_ku.detach().repeat([views, 1]),
                pseudo_label.detach().repeat([views, 1]))


# --------------------------------------------------------------------------- main.py
# (utils/lr_schedule.py is SimMatch's: warmup_learning_rate, adjust_learning_rate from there)

class Authors:
    """main.py: the model in DDP (default arguments), SGD over model.parameters() (every parameter
    decayed: LayerNorm, BN and biases too), GradScaler(enabled=fp16), and `train`'s step."""

    def __init__(self, model: SimMatchV2, steps_per_epoch: int, fp16: bool = False):
        self.module = self.model = model
        if world() > 1:
            self.model = nn.parallel.DistributedDataParallel(model)
        hp = model.hp
        self.steps, self.fp16 = steps_per_epoch, fp16
        self.optimizer = torch.optim.SGD(self.model.parameters(), hp["lr"], momentum=hp["momentum"],
                                         weight_decay=hp["weight_decay"], nesterov=hp["nesterov"])
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)

    def set_lr(self, epoch: int, i: int) -> float:
        """main_worker sets the cosine at each epoch's start from warmup_epoch on; train the warm-up."""
        hp = self.module.hp
        if i == 0 and epoch >= hp["warmup_epoch"]:
            adjust_learning_rate(self.optimizer, epoch, hp["lr"], hp["warmup_epoch"], hp["epochs"])
        if epoch < hp["warmup_epoch"]:
            warmup_learning_rate(self.optimizer, epoch * self.steps + i + 1, hp["warmup_epoch"] * self.steps, hp["lr"])
        return self.optimizer.param_groups[0]["lr"]

    def step(self, epoch: int, i: int, labeled: dict, unlabeled: dict, idx_shuffle=None) -> dict:
        hp = self.module.hp
        lr = self.set_lr(epoch, i)
        with torch.autocast(labeled["x"].device.type, dtype=torch.float16, enabled=self.fp16):
            logits_qx, logits_qu, loss_ee, loss_ne, prob_ku, pseudo_label = self.model(
                labeled["x"], unlabeled["weak"], list(unlabeled["strong"]), labeled["index"], idx_shuffle)
            mask = prob_ku.max(dim=-1).values.ge(hp["threshold"]).float()
            loss_sup = F.cross_entropy(logits_qx, labeled["y"], reduction="mean")
            loss_nn = (torch.sum(-F.log_softmax(logits_qu, dim=1) * pseudo_label.detach(), dim=1) * mask).mean()
            loss = loss_sup + hp["lambda_nn"] * loss_nn + hp["lambda_ee"] * loss_ee + hp["lambda_ne"] * loss_ne
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        curr_step = epoch * self.steps + i + 1
        self.module.momentum_update_ema(ema_momentum(hp["ema_m"], curr_step, hp["epochs"] * self.steps))
        return {"lr": lr, "loss": loss.detach(), "loss_sup": loss_sup.detach(), "loss_nn": loss_nn.detach(),
                "loss_ee": loss_ee.detach(), "loss_ne": loss_ne.detach(), "mask": mask.mean(), **self.module.seen}
