"""USB's SimMatch training step on CIFAR, transcribed for tests/authors/test_table1_usb_simmatch.py.

Source: github microsoft/Semi-supervised-learning (USB, MIT licence), read at commit
1ef4cbebcc0b368158315aeb425053858cf6c845:
- semilearn/algorithms/simmatch/simmatch.py: `SimMatch_Net` (Linear(d, d) - ReLU - Linear(d, proj),
  its `l2norm`), `SimMatch.__init__` (CIFAR: use_ema_teacher = False, ema_bank = 0.7, K = the number
  of labels), `init` (the bank: Gaussian [proj, K], columns normalised; labels zero),
  `update_bank`, `train_step` (the use_cat path of the CIFAR configs: one forward of labeled + weak
  + strong images);
- semilearn/algorithms/hooks/dist_align.py: `DistAlignQueueHook` with p_target_type='uniform';
- semilearn/algorithms/hooks/masking.py: `FixedThresholdingHook` (softmax_x_ulb=False);
- semilearn/core/criterions/cross_entropy.py `ce_loss`, consistency.py `consistency_loss` ('ce');
- semilearn/core/hooks/param_update.py `ParamUpdateHook` (backward, step, scheduler step,
  zero_grad), semilearn/core/hooks/ema.py `EMAHook`, semilearn/core/utils/misc.py `EMA` and
  `send_model_cuda` (distributed: SyncBatchNorm, then DDP with find_unused_parameters=True,
  broadcast_buffers=False), semilearn/core/utils/build.py `get_optimizer` and
  `get_cosine_schedule_with_warmup` (num_cycles 7/16), semilearn/nets/utils.py
  `param_groups_weight_decay` (no decay where ndim <= 1 or the name ends in ".bias"; SimMatch_Net
  has no `no_weight_decay`), semilearn/core/algorithmbase.py (`train`: epoch counted by
  num_iter_per_epoch = num_train_iter // epoch; `concat_all_gather` of algorithms/utils/ops.py);
- config/classic_cv/simmatch/simmatch_cifar10_40_0.yaml (RECIPE below).

This is the computation written anew in this module's own classes; nothing of the project is used
on this side. torchvision gives the ResNet layers of the test's small network (USB's CIFAR net is a
WRN-28-2). Three things are inputs here rather than drawn by the code itself: the batches (USB's
samplers), the initial bank and DA queue (the test gives both sides the same state), and, in
`UsbSimMatch`, two switches its test documents: `literal_bank` and `head_decays_before_lin`.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

# config/classic_cv/simmatch/simmatch_cifar10_40_0.yaml, and simmatch.py's ema_bank for CIFAR
RECIPE = {"T": 0.1, "p_cutoff": 0.95, "smoothing_alpha": 0.9, "da_len": 32, "in_loss_ratio": 1.0,
          "ulb_loss_ratio": 1.0, "ema_m": 0.999, "lr": 0.03, "momentum": 0.9, "weight_decay": 5e-4,
          "nesterov": True, "num_cycles": 7.0 / 16.0, "num_warmup_iter": 0, "ema_bank": 0.7,
          "iters_per_epoch": 1024, "uratio": 7, "batch_size": 64}


def world() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else 1


@torch.no_grad()
def concat_all_gather(t: torch.Tensor) -> torch.Tensor:
    """algorithms/utils/ops.py (USB calls it only when distributed)."""
    if world() == 1:
        return t
    out = [torch.ones_like(t) for _ in range(world())]
    tdist.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0)


# --------------------------------------------------------------------------- network

class Backbone(torchvision.models.ResNet):
    """A torchvision ResNet with the 3x3 stride-1 stem of small images, called as USB's backbones
    are: forward(x, only_feat=True) the pooled feature, forward(feat, only_fc=True) the logits."""

    def __init__(self, layers: list[int], num_classes: int):
        super().__init__(torchvision.models.resnet.BasicBlock, layers, num_classes=num_classes)
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.maxpool = nn.Identity()
        self.num_features = self.fc.in_features

    def forward(self, x, only_fc: bool = False, only_feat: bool = False):
        if only_fc:
            return self.fc(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        if only_feat:
            return x
        return {"logits": self.fc(x), "feat": x}


class SimMatchNet(nn.Module):
    """simmatch.py `SimMatch_Net` (use_epass=False: one projection head, see the test's docstring)."""

    def __init__(self, base: Backbone, proj_size: int):
        super().__init__()
        self.backbone = base
        self.num_features = base.num_features
        self.mlp_proj = nn.Sequential(nn.Linear(self.num_features, self.num_features), nn.ReLU(inplace=False),
                                      nn.Linear(self.num_features, proj_size))

    @staticmethod
    def l2norm(x, power=2):
        norm = x.pow(power).sum(1, keepdim=True).pow(1.0 / power)
        return x.div(norm)

    def forward(self, x):
        feat = self.backbone(x, only_feat=True)
        logits = self.backbone(feat, only_fc=True)
        return {"logits": logits, "feat": self.l2norm(self.mlp_proj(feat))}


class AllReduceSum(torch.autograd.Function):
    """A sum over the ranks whose backward is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        tdist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        tdist.all_reduce(grad, group=ctx.group)
        return grad, None


class SyncBatchNorm(nn.BatchNorm2d):
    """torch.nn.SyncBatchNorm's arithmetic, which USB's send_model_cuda puts in place of every BN
    when distributed, written with autograd ops so that it runs on CPU under gloo (SyncBatchNorm
    itself needs CUDA): the mean and biased variance of the whole global batch normalise, their
    all-reduces are differentiable (the backward all-reduces the gradient sums, as SyncBatchNorm's
    backward does), and the running variance takes the global batch's unbiased variance."""

    group = None  # a process group of its own, so that its collectives never meet DDP's

    def forward(self, x):
        if not (self.training and world() > 1):
            return super().forward(x)
        c, dims, shape = x.shape[1], [0, 2, 3], (1, -1, 1, 1)
        count = x.numel() // c * world()
        mean = AllReduceSum.apply(x.sum(dims), self.group) / count
        centred = x - mean.view(shape)
        var = AllReduceSum.apply((centred * centred).sum(dims), self.group) / count
        y = centred * torch.rsqrt(var + self.eps).view(shape) * self.weight.view(shape) + self.bias.view(shape)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach() * m)
            self.running_var.mul_(1 - m).add_(var.detach() * (count / (count - 1)) * m)
        return y


def convert_sync_bn(module: nn.Module, group) -> None:
    """In place: every BatchNorm2d of `module` becomes a SyncBatchNorm holding the same tensors."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SyncBatchNorm):
            bn = SyncBatchNorm(child.num_features, child.eps, child.momentum)
            bn.group = group
            bn.weight, bn.bias = child.weight, child.bias
            bn.running_mean, bn.running_var = child.running_mean, child.running_var
            bn.num_batches_tracked = child.num_batches_tracked
            setattr(module, name, bn)
        else:
            convert_sync_bn(child, group)


# --------------------------------------------------------------------------- hooks and losses

class DistAlignQueue:
    """hooks/dist_align.py `DistAlignQueueHook`, p_target 'uniform': a queue of da_len global batch
    means, zero at the start, this step's mean written before it is used, and
    p <- normalize(p * (mean(p_target) + 1e-6) / (mean of all da_len rows + 1e-6))."""

    def __init__(self, num_classes: int, queue_length: int):
        self.p_target = torch.ones(queue_length, num_classes, dtype=torch.float) / num_classes
        self.p_model = torch.zeros(queue_length, num_classes, dtype=torch.float)
        self.p_model_ptr = torch.zeros(1, dtype=torch.long)
        self.queue_length = queue_length

    @torch.no_grad()
    def dist_align(self, probs_x_ulb: torch.Tensor) -> torch.Tensor:
        probs = concat_all_gather(probs_x_ulb) if world() > 1 else probs_x_ulb
        ptr = int(self.p_model_ptr)
        self.p_model[ptr] = probs.detach().mean(dim=0)
        self.p_model_ptr[0] = (ptr + 1) % self.queue_length
        aligned = probs_x_ulb * (self.p_target.mean(dim=0) + 1e-6) / (self.p_model.mean(dim=0) + 1e-6)
        return aligned / aligned.sum(dim=-1, keepdim=True)


def fixed_threshold_mask(probs: torch.Tensor, p_cutoff: float) -> torch.Tensor:
    """hooks/masking.py `FixedThresholdingHook.masking` with softmax_x_ulb=False."""
    max_probs, _ = torch.max(probs.detach(), dim=-1)
    return max_probs.ge(p_cutoff).to(max_probs.dtype)


def ce_loss(logits, targets, reduction="none"):
    """core/criterions/cross_entropy.py: soft targets when they have the logits' shape."""
    log_pred = F.log_softmax(logits, dim=-1)
    if logits.shape == targets.shape:
        nll = torch.sum(-targets * log_pred, dim=1)
        return nll if reduction == "none" else nll.mean()
    return F.nll_loss(log_pred, targets, reduction=reduction)


def consistency_loss(logits, targets, mask=None):
    """core/criterions/consistency.py, name='ce'."""
    loss = ce_loss(logits, targets, reduction="none")
    if mask is not None:
        loss = loss * mask
    return loss.mean()


class EMA:
    """core/utils/misc.py `EMA`: a shadow of the parameters, shadow <- (1 - d) p + d shadow; the
    buffers' shadow is the model's buffers themselves (EMAHook then loads the model's state dict
    into the EMA model and the shadow over it)."""

    def __init__(self, model: nn.Module, decay: float):
        self.model, self.decay = model, decay
        self.shadow = {name: p.data.clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self) -> None:
        for name, param in self.model.named_parameters():
            self.shadow[name] = ((1.0 - self.decay) * param.data + self.decay * self.shadow[name]).clone()
        for name, buffer in self.model.named_buffers():
            self.shadow[name] = buffer.clone()


def param_groups_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """nets/utils.py (no_weight_decay_list empty: SimMatch_Net defines none)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def cosine_lambda(num_training_steps: int, num_cycles: float = RECIPE["num_cycles"], num_warmup_steps: int = 0):
    """core/utils/build.py `get_cosine_schedule_with_warmup`'s factor of step k (LambdaLR)."""

    def factor(current_step: int) -> float:
        if current_step < num_warmup_steps:
            return float(current_step) / float(max(1, num_warmup_steps))
        steps = float(current_step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
        return max(0.0, math.cos(math.pi * num_cycles * steps))

    return factor


def usb_bank_update(mem_bank: torch.Tensor, k: torch.Tensor, index: torch.Tensor, ema_bank: float) -> None:
    """USB's update_bank line as written (use_ema_teacher=False): F.normalize with its default
    dim=1 on the [proj, n] matrix, so each feature dimension is normalised across the n samples."""
    mem_bank[:, index] = F.normalize(ema_bank * mem_bank[:, index] + (1 - ema_bank) * k.t().detach())


def per_sample_bank_update(mem_bank: torch.Tensor, k: torch.Tensor, index: torch.Tensor, ema_bank: float) -> None:
    """The same temporal ensemble with each sample's column normalised (the paper's reading); the
    columns written in order, so a slot that appears twice keeps the later row."""
    new = F.normalize(ema_bank * mem_bank[:, index] + (1 - ema_bank) * k.t().detach(), dim=0)
    for j, i in enumerate(index.tolist()):
        mem_bank[:, i] = new[:, j]


# --------------------------------------------------------------------------- the algorithm

class UsbSimMatch:
    """simmatch.py `SimMatch` on its CIFAR path with AlgorithmBase's loop and hooks: the model
    (SyncBatchNorm and DDP above one process), the SGD and LambdaLR of `set_optimizer`, the EMA
    hook, the bank, the DA queue, and `step` = train_step + ParamUpdateHook + EMAHook.

    `iters_per_epoch`: USB's epoch length (num_train_iter // epoch: 1024); L_in and the aggregation
    are off while epoch == 0. `literal_bank`: USB's update_bank line as written (else per sample,
    `per_sample_bank_update`). `head_decays_before_lin`: USB's epoch 0 keeps the head in the graph
    through in_loss * 0.0, so SGD receives a zero gradient for it and applies weight decay and
    momentum; False drops that gradient (the head then has none, as in the project).
    """

    def __init__(self, net: SimMatchNet, num_classes: int, num_labels: int, num_train_iter: int,
                 iters_per_epoch: int = RECIPE["iters_per_epoch"], literal_bank: bool = False,
                 head_decays_before_lin: bool = True):
        r = RECIPE
        self.num_classes, self.T, self.p_cutoff = num_classes, r["T"], r["p_cutoff"]
        self.smoothing_alpha = r["smoothing_alpha"]
        self.lambda_u, self.lambda_in = r["ulb_loss_ratio"], r["in_loss_ratio"]
        self.ema_bank, self.iters_per_epoch = r["ema_bank"], iters_per_epoch
        self.literal_bank, self.head_decays_before_lin = literal_bank, head_decays_before_lin
        self.module = net
        self.model: nn.Module = net
        if world() > 1:
            convert_sync_bn(net, tdist.new_group(list(range(world()))))
            with warnings.catch_warnings():  # USB's broadcast_buffers, which newer torch names otherwise
                warnings.simplefilter("ignore", FutureWarning)
                self.model = nn.parallel.DistributedDataParallel(net, broadcast_buffers=False,
                                                                 find_unused_parameters=True)
        self.model.train()
        proj_size = net.mlp_proj[-1].out_features
        self.mem_bank = F.normalize(torch.randn(proj_size, num_labels), dim=0)
        self.labels_bank = torch.zeros(num_labels, dtype=torch.long)
        self.da = DistAlignQueue(num_classes, r["da_len"])
        self.optimizer = torch.optim.SGD(param_groups_weight_decay(self.model, r["weight_decay"]), lr=r["lr"],
                                         momentum=r["momentum"], weight_decay=r["weight_decay"], nesterov=r["nesterov"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine_lambda(num_train_iter))
        self.ema_model: SimMatchNet | None = None
        self.ema: EMA | None = None
        self.it = 0

    def start(self, ema_model: SimMatchNet) -> None:
        """set_ema_model and EMAHook.before_run, once the model holds its initial weights."""
        ema_model.load_state_dict(self.module.state_dict())
        self.ema_model = ema_model
        self.ema = EMA(self.module, RECIPE["ema_m"])

    @property
    def epoch(self) -> int:
        return self.it // self.iters_per_epoch

    @torch.no_grad()
    def update_bank(self, k, labels, index) -> None:
        if world() > 1:
            k, labels, index = concat_all_gather(k), concat_all_gather(labels), concat_all_gather(index)
        (usb_bank_update if self.literal_bank else per_sample_bank_update)(self.mem_bank, k, index, self.ema_bank)
        for j, i in enumerate(index.tolist()):  # in order, as the bank's rows
            self.labels_bank[i] = labels[j]

    def train_step(self, idx_lb, x_lb, y_lb, x_ulb_w, x_ulb_s) -> dict:
        num_lb, num_ulb = y_lb.shape[0], x_ulb_w.shape[0]
        bank = self.mem_bank.clone().detach()
        outputs = self.model(torch.cat((x_lb, x_ulb_w, x_ulb_s)))
        logits, feats = outputs["logits"], outputs["feat"]
        logits_x_lb, ema_feats_x_lb = logits[:num_lb], feats[:num_lb]
        ema_logits_x_ulb_w, logits_x_ulb_s = logits[num_lb:].chunk(2)
        ema_feats_x_ulb_w, feats_x_ulb_s = feats[num_lb:].chunk(2)
        sup_loss = ce_loss(logits_x_lb, y_lb, reduction="mean")
        with torch.no_grad():  # (USB: between ema.apply_shadow() and ema.restore(), no forward there)
            ema_probs_x_ulb_w = F.softmax(ema_logits_x_ulb_w, dim=-1)
            ema_probs_x_ulb_w = self.da.dist_align(ema_probs_x_ulb_w.detach())
        with torch.no_grad():
            teacher_logits = ema_feats_x_ulb_w @ bank
            teacher_prob_orig = F.softmax(teacher_logits / self.T, dim=1)
            factor = ema_probs_x_ulb_w.gather(1, self.labels_bank.expand([num_ulb, -1]))
            teacher_prob = teacher_prob_orig * factor
            teacher_prob /= torch.sum(teacher_prob, dim=1, keepdim=True)
            bs = teacher_prob_orig.size(0)
            aggregated_prob = torch.zeros([bs, self.num_classes])
            aggregated_prob = aggregated_prob.scatter_add(1, self.labels_bank.expand([bs, -1]), teacher_prob_orig)
            probs_x_ulb_w = ema_probs_x_ulb_w * self.smoothing_alpha + aggregated_prob * (1 - self.smoothing_alpha)
        student_logits = feats_x_ulb_s @ bank
        student_prob = F.softmax(student_logits / self.T, dim=1)
        in_loss = torch.sum(-teacher_prob.detach() * torch.log(student_prob), dim=1).mean()
        propagated = self.epoch != 0
        if not propagated:
            in_loss *= 0.0
            probs_x_ulb_w = ema_probs_x_ulb_w
        mask = fixed_threshold_mask(probs_x_ulb_w, self.p_cutoff)
        unsup_loss = consistency_loss(logits_x_ulb_s, probs_x_ulb_w, mask=mask)
        total_loss = sup_loss + self.lambda_u * unsup_loss + self.lambda_in * in_loss
        self.update_bank(ema_feats_x_lb, y_lb, idx_lb)
        return {"loss": total_loss, "loss_x": sup_loss.detach(), "loss_u": unsup_loss.detach(),
                "loss_in": in_loss.detach(), "mask": mask.mean(), "p_w": ema_probs_x_ulb_w,
                "p_hat": probs_x_ulb_w, "q_hat": teacher_prob if propagated else None}

    def step(self, labeled: dict, unlabeled: dict) -> dict:
        """One iteration of AlgorithmBase.train: train_step, then the after_train_step hooks
        (ParamUpdateHook, EMAHook). The lr it trained at and its gradients (before zero_grad) are
        returned with train_step's quantities."""
        lr = self.optimizer.param_groups[0]["lr"]
        out = self.train_step(labeled["index"], labeled["x"], labeled["y"], unlabeled["weak"],
                              unlabeled["strong"][0])
        out["loss"].backward()
        if self.epoch == 0 and not self.head_decays_before_lin:
            for p in self.module.mlp_proj.parameters():
                assert p.grad is not None and not p.grad.any()  # USB's in_loss * 0.0: zero, not absent
                p.grad = None
        grads = {n: None if p.grad is None else p.grad.clone() for n, p in self.module.named_parameters()}
        self.optimizer.step()
        self.scheduler.step()
        self.model.zero_grad()
        self.ema.update()
        self.ema_model.load_state_dict(self.module.state_dict())
        self.ema_model.load_state_dict(self.ema.shadow, strict=False)
        self.it += 1
        out.update(lr=lr, grads=grads, loss=out["loss"].detach())
        return out
