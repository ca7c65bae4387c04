"""The SimMatch authors' training step, transcribed for tests/authors/test_authors.py.

Source: github mingkai-zheng/SimMatch, read at commit 78e8866a61db627808d97ffd680c5f39e30343bb
(the files below are unchanged up to f10254b, the newest snapshot read): models/simmatch.py
(`ResNet`, `SimMatch`: `__init__`, `momentum_update_ema` without --eman, `_update_bank`,
`distribution_alignment`, `_batch_shuffle_ddp`, `_batch_unshuffle_ddp`, `forward`), simmatch.py
(`main_worker`: DDP, SGD; `train`: the losses, the warm-up call, the step, the EMA update),
utils/lr_schedule.py (`warmup_learning_rate`, `adjust_learning_rate` with --cos),
backbone/resnet.py (torchvision's ResNet without `fc`, returning the pooled feature) and the
1% recipe of script/train.sh (--nesterov --lambda_in 5 --lr 0.03 --epochs 400 --cos
--warmup-epoch 5 --st 0.1 --tt 0.1 --c_smooth 0.9 --DA; defaults mu 5, lambda_u 10,
threshold 0.7, ema-m 0.999, wd 1e-4). Their files carry a non-commercial licence: this is
the maths written anew, nothing of this project is used on this side.

Two inputs stand in for what their code draws itself: the shuffle-BN permutation (theirs:
torch.randperm on rank 0, broadcast) and the batches (theirs: DistributedSampler loaders).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

# script/train.sh (1%) and simmatch.py's argparse defaults
RECIPE = {"lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True, "epochs": 400,
          "warmup_epoch": 5, "st": 0.1, "tt": 0.1, "c_smooth": 0.9, "lambda_u": 10.0, "lambda_in": 5.0,
          "threshold": 0.7, "ema_m": 0.999, "DA_len": 256}


def world() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else 1


def rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else 0


@torch.no_grad()
def concat_all_gather(t: torch.Tensor) -> torch.Tensor:
    if world() == 1:  # theirs always runs under torch.distributed; one process gathers itself
        return t
    out = [torch.ones_like(t) for _ in range(world())]
    tdist.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0)


class Trunk(nn.Module):
    """backbone/resnet.py: torchvision's ResNet layers, no `fc`, forward to the flattened pool.
    `small_input`: the 3x3 stride-1 stem without max-pool the tiny test images need (theirs is
    224 px with the 7x7 stem)."""

    def __init__(self, layers: list[int], small_input: bool):
        super().__init__()
        tv = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, layers)
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False) if small_input else tv.conv1
        self.bn1, self.relu = tv.bn1, tv.relu
        self.maxpool = nn.Identity() if small_input else tv.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = tv.layer1, tv.layer2, tv.layer3, tv.layer4
        self.avgpool = tv.avgpool
        self.out_channels = 512 * torchvision.models.resnet.BasicBlock.expansion

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class ResNet(nn.Module):
    """models/simmatch.py `ResNet`: fc and head side by side on the pooled feature; the head
    Linear(c, c) - ReLU - Linear(c, dim) (c = 2048 for their ResNet-50), output L2-normalised."""

    def __init__(self, make_trunk, num_classes: int, dim: int):
        super().__init__()
        self.backbone = make_trunk()
        assert not hasattr(self.backbone, "fc")
        c = self.backbone.out_channels
        self.fc = nn.Linear(c, num_classes)
        self.head = nn.Sequential(nn.Linear(c, c), nn.ReLU(inplace=True), nn.Linear(c, dim))

    def forward(self, x):
        x = self.backbone(x)
        embedding = self.head(x)
        logits = self.fc(x)
        return logits, F.normalize(embedding)


class SimMatch(nn.Module):
    """models/simmatch.py `SimMatch` with eman=False and --DA (their published runs)."""

    def __init__(self, make_trunk, num_classes: int, dim: int, K: int):
        super().__init__()
        self.momentum, self.num_classes = RECIPE["ema_m"], num_classes
        self.main = ResNet(make_trunk, num_classes, dim)
        self.ema = ResNet(make_trunk, num_classes, dim)
        self.init_ema()
        # their bank: Gaussian [dim, K], each column (one slot) normalised; labels zero until written
        self.register_buffer("bank", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("labels", torch.zeros(K, dtype=torch.long))
        self.DA_len = RECIPE["DA_len"]
        self.register_buffer("DA_queue", torch.zeros(self.DA_len, num_classes, dtype=torch.float))
        self.register_buffer("DA_ptr", torch.zeros(1, dtype=torch.long))
        self.lin_from_epoch = 1  # theirs: start_unlabel = epoch > 0 (the tests' controls change these two)
        self.tt = RECIPE["tt"]
        self.seen: dict = {}  # this step's targets, kept for the comparison

    @torch.no_grad()
    def init_ema(self):
        for param_main, param_ema in zip(self.main.parameters(), self.ema.parameters()):
            param_ema.data.copy_(param_main.data)
            param_ema.requires_grad = False

    @torch.no_grad()
    def momentum_update_ema(self):
        for param_q, param_k in zip(self.main.parameters(), self.ema.parameters()):
            param_k.data = param_k.data * self.momentum + param_q.data * (1.0 - self.momentum)

    @torch.no_grad()
    def _update_bank(self, k, labels, index):
        k, labels, index = concat_all_gather(k), concat_all_gather(labels), concat_all_gather(index)
        self.bank[:, index] = k.t()
        self.labels[index] = labels

    @torch.no_grad()
    def distribution_alignment(self, probs):
        probs_bt_mean = probs.mean(0)
        if world() > 1:
            tdist.all_reduce(probs_bt_mean)
        ptr = int(self.DA_ptr)
        self.DA_queue[ptr] = probs_bt_mean / world()
        self.DA_ptr[0] = (ptr + 1) % self.DA_len
        probs = probs / self.DA_queue.mean(0)  # the mean over all 256 rows, unwritten (zero) ones too
        probs = probs / probs.sum(dim=1, keepdim=True)
        return probs.detach()

    @torch.no_grad()
    def _batch_shuffle_ddp(self, x, idx_shuffle):
        batch_size_this = x.shape[0]
        x_gather = concat_all_gather(x)
        num_gpus = x_gather.shape[0] // batch_size_this
        if world() > 1:
            tdist.broadcast(idx_shuffle, src=0)  # theirs: drawn on every rank, rank 0's kept
        idx_unshuffle = torch.argsort(idx_shuffle)
        idx_this = idx_shuffle.view(num_gpus, -1)[rank()]
        return x_gather[idx_this], idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle_ddp(self, x, idx_unshuffle):
        batch_size_this = x.shape[0]
        x_gather = concat_all_gather(x)
        num_gpus = x_gather.shape[0] // batch_size_this
        idx_this = idx_unshuffle.view(num_gpus, -1)[rank()]
        return x_gather[idx_this]

    def forward(self, im_x, im_u_w, im_u_s, labels, index, epoch, idx_shuffle):
        start_unlabel = epoch >= self.lin_from_epoch
        batch_x, batch_u = im_x.shape[0], im_u_w.shape[0]
        bank = self.bank.clone().detach()

        logits_q, feat_q = self.main(torch.cat((im_x, im_u_s)))
        logits_qx, logits_qu = logits_q[:batch_x], logits_q[batch_x:]
        feat_qu = feat_q[batch_x:]

        with torch.no_grad():
            im_k = torch.cat([im_x, im_u_w])
            im, idx_unshuffle = self._batch_shuffle_ddp(im_k, idx_shuffle)
            logits_k, feat_k = self.ema(im)
            feat_k = self._batch_unshuffle_ddp(feat_k, idx_unshuffle)
            logits_k = self._batch_unshuffle_ddp(logits_k, idx_unshuffle)
            logits_ku = logits_k[batch_x:]
            feat_kx, feat_ku = feat_k[:batch_x], feat_k[batch_x:]
            prob_ku_orig = self.distribution_alignment(F.softmax(logits_ku, dim=-1))
        teacher_prob = None
        if start_unlabel:
            with torch.no_grad():
                teacher_logits = feat_ku @ bank
                teacher_prob_orig = F.softmax(teacher_logits / self.tt, dim=1)
                factor = prob_ku_orig.gather(1, self.labels.expand([batch_u, -1]))
                teacher_prob = teacher_prob_orig * factor
                teacher_prob /= torch.sum(teacher_prob, dim=1, keepdim=True)
                bs = teacher_prob_orig.size(0)
                aggregated_prob = torch.zeros([bs, self.num_classes], device=teacher_prob_orig.device)
                aggregated_prob = aggregated_prob.scatter_add(1, self.labels.expand([bs, -1]), teacher_prob_orig)
                c = RECIPE["c_smooth"]
                prob_ku = prob_ku_orig * c + aggregated_prob * (1 - c)
            student_logits = feat_qu @ bank
            student_prob = F.softmax(student_logits / RECIPE["st"], dim=1)
            assert bool((student_prob > 0).all())  # their log(softmax) is finite: = log_softmax to rounding
            loss_in = torch.sum(-teacher_prob.detach() * torch.log(student_prob), dim=1)
        else:
            loss_in = torch.tensor(0, dtype=torch.float)
            prob_ku = prob_ku_orig

        self._update_bank(feat_kx, labels, index)
        self.seen = {"p_w": prob_ku_orig, "p_hat": prob_ku, "q_hat": teacher_prob}
        return logits_qx, prob_ku, logits_qu, loss_in


# --------------------------------------------------------------------------- simmatch.py and utils

def warmup_learning_rate(optimizer, curr_step: int, warmup_step: int, lr: float) -> None:
    scalar = min(1.0, max(0.0, float(curr_step) / float(max(1, warmup_step))))
    for group in optimizer.param_groups:
        group["lr"] = lr * scalar


def adjust_learning_rate(optimizer, epoch: int, lr: float, warmup_epoch: int, epochs: int) -> None:
    progress = float(epoch - warmup_epoch) / float(epochs - warmup_epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule(optimizer, epoch: int, i: int, steps: int, lr: float, warmup_epoch: int, epochs: int) -> float:
    """The lr of step i of `epoch` as main_worker (at each epoch's start) and train (at each
    warm-up step, curr_step = epoch * len(train_loader_u) + i + 1) write it into the optimizer."""
    if i == 0 and epoch >= warmup_epoch:
        adjust_learning_rate(optimizer, epoch, lr, warmup_epoch, epochs)
    if epoch < warmup_epoch:
        warmup_learning_rate(optimizer, epoch * steps + i + 1, warmup_epoch * steps, lr)
    return optimizer.param_groups[0]["lr"]


def loader_len(num_items: int, world_size: int, batch: int) -> int:
    """len(DataLoader(DistributedSampler(dataset), batch, drop_last=True)) on one rank."""
    return math.ceil(num_items / world_size) // batch


class Authors:
    """simmatch.py: the model in DDP (find_unused_parameters=True), SGD over model.parameters()
    (every parameter decayed: BN and biases too), and `train`'s step."""

    def __init__(self, model: SimMatch, lr: float, steps_per_epoch: int, epochs: int = RECIPE["epochs"],
                 warmup_epoch: int = RECIPE["warmup_epoch"]):
        self.module = model
        self.model = model
        if world() > 1:
            self.model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        self.lr, self.steps, self.epochs, self.warmup_epoch = lr, steps_per_epoch, epochs, warmup_epoch
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr, momentum=RECIPE["momentum"],
                                         weight_decay=RECIPE["weight_decay"], nesterov=RECIPE["nesterov"])

    def set_lr(self, epoch: int, i: int) -> float:
        return schedule(self.optimizer, epoch, i, self.steps, self.lr, self.warmup_epoch, self.epochs)

    def step(self, epoch: int, i: int, labeled: dict, unlabeled: dict, idx_shuffle: torch.Tensor) -> dict:
        lr = self.set_lr(epoch, i)
        images_x, targets_x, index = labeled["x"], labeled["y"], labeled["index"]
        images_u_w, images_u_s = unlabeled["weak"], unlabeled["strong"][0]
        logits_x, pseudo_label, logits_u_s, loss_in = self.model(
            images_x, images_u_w, images_u_s, targets_x, index, epoch, idx_shuffle)
        max_probs, _ = torch.max(pseudo_label, dim=-1)
        mask = max_probs.ge(RECIPE["threshold"]).float()
        loss_x = F.cross_entropy(logits_x, targets_x, reduction="mean")
        loss_u = (torch.sum(-F.log_softmax(logits_u_s, dim=1) * pseudo_label.detach(), dim=1) * mask).mean()
        loss_in = loss_in.mean()
        loss = loss_x + RECIPE["lambda_u"] * loss_u + RECIPE["lambda_in"] * loss_in
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.module.momentum_update_ema()
        return {"lr": lr, "loss": loss.detach(), "loss_x": loss_x.detach(), "loss_u": loss_u.detach(),
                "loss_in": loss_in.detach(), "mask": mask.mean(), **self.module.seen}
