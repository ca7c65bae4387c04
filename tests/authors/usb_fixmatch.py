"""USB's FixMatch training step, transcribed for tests/authors/test_table1_usb_fixmatch.py.

Source: github microsoft/Semi-supervised-learning (USB, MIT licence), read at commit
1ef4cbebcc0b368158315aeb425053858cf6c845 (the newest snapshot read):
- semilearn/algorithms/fixmatch/fixmatch.py: `FixMatch.train_step` with use_cat (one forward of
  cat(x_lb, x_ulb_w, x_ulb_s), the logits split by `chunk(2)`), hard_label True, `set_hooks`;
- semilearn/algorithms/hooks/masking.py: `FixedThresholdingHook.masking` (softmax_x_ulb False:
  the probabilities given, max >= p_cutoff, as the probabilities' dtype);
- semilearn/algorithms/hooks/pseudo_label.py: `PseudoLabelingHook.gen_ulb_targets` (use_hard_label:
  the argmax of the detached probabilities);
- semilearn/core/criterions/cross_entropy.py `ce_loss` (log_softmax then nll_loss) and
  consistency.py `consistency_loss` ('ce', times the mask, mean over the batch);
- semilearn/core/algorithmbase.py: `compute_prob` (softmax), `set_optimizer`, `set_ema_model`
  (a second network loaded with the model's state dict), `train` (train_step, then the hooks'
  `after_train_step` in priority order, then it += 1), `set_hooks` (ParamUpdateHook HIGHEST,
  EMAHook HIGH);
- semilearn/core/hooks/param_update.py `ParamUpdateHook.after_train_step` (backward, optimizer
  step, scheduler step, model.zero_grad(); amp and clip_grad off in the CIFAR configs);
- semilearn/core/hooks/ema.py `EMAHook` (before_run: EMA(model).register(); after_train_step:
  update, then ema_model loads the model's state dict and then the shadow, strict=False);
- semilearn/core/utils/misc.py: `EMA` (register, update: parameters (1 - decay) * param + decay *
  shadow, buffers copied from the model) and `send_model_cuda` (distributed: SyncBatchNorm, then
  DistributedDataParallel with broadcast_buffers=False, find_unused_parameters=True, for the model
  and the ema model alike);
- semilearn/core/utils/build.py: `get_optimizer` (SGD, nesterov=True, bn_wd_skip=True: the net's
  `no_weight_decay()` names) and `get_cosine_schedule_with_warmup` (LambdaLR, num_cycles 7/16);
- semilearn/nets/utils.py `param_groups_weight_decay` (no decay: ndim <= 1, a name ending in
  ".bias", or a name the net lists) and semilearn/nets/resnet/resnet.py `no_weight_decay` (names
  holding "bn" or "bias");
- config/classic_cv/fixmatch/fixmatch_cifar10_40_0.yaml: the recipe (RECIPE below).

The network is the test's own: torchvision's ResNet layers with its `fc`, the small-input stem
(3x3 stride 1, no max-pool), returning USB's output dict {'logits', 'feat'}. torch's
SyncBatchNorm, which USB's distributed runs use, refuses CPU tensors; `SyncBatchNorm2d` below
writes its arithmetic out (torch/nn/modules/_functions.py `SyncBatchNorm`: per-rank mean and
invstd, gathered and merged as batch_norm_gather_stats_with_counts does; its backward's all-reduce
of sum_dy and sum_dy_xmu). Nothing of the project is used on this side.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

# config/classic_cv/fixmatch/fixmatch_cifar10_40_0.yaml (and train.py's defaults: num_warmup_iter 0)
RECIPE = {"lr": 0.03, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True, "p_cutoff": 0.95,
          "T": 0.5, "hard_label": True, "ulb_loss_ratio": 1.0, "ema_m": 0.999, "num_train_iter": 1048576,
          "num_warmup_iter": 0, "batch_size": 64, "uratio": 7, "use_cat": True, "amp": False}


def world() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else 1


# --------------------------------------------------------------------------- network and SyncBN

class _SyncBN(torch.autograd.Function):
    """torch's SyncBatchNorm function, written out for CPU tensors."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum):
        c = x.shape[1]
        dims = [0, 2, 3]
        var, mean = torch.var_mean(x, dim=dims, unbiased=False)  # batch_norm_stats: mean, invstd
        invstd = 1.0 / torch.sqrt(var + eps)
        count = x.new_full((1,), x.numel() // c)
        mine = torch.cat([mean, invstd, count])
        gathered = [torch.empty_like(mine) for _ in range(world())]
        tdist.all_gather(gathered, mine)  # gloo: a list, as torch's SyncBatchNorm does there
        # batch_norm_gather_stats_with_counts: Welford's merge of the ranks' (count, mean, M2)
        n, m, m2 = 0.0, torch.zeros_like(mean), torch.zeros_like(mean)
        for row in gathered:
            m_i, invstd_i, n_i = row[:c], row[c:2 * c], float(row[2 * c])
            m2_i = (1.0 / (invstd_i * invstd_i) - eps) * n_i
            total = n + n_i
            delta = m_i - m
            m = m + delta * (n_i / total)
            m2 = m2 + m2_i + delta * delta * (n * n_i / total)
            n = total
        global_invstd = 1.0 / torch.sqrt(m2 / n + eps)
        with torch.no_grad():
            running_mean.mul_(1.0 - momentum).add_(m, alpha=momentum)
            running_var.mul_(1.0 - momentum).add_(m2 / (n - 1.0), alpha=momentum)
        ctx.save_for_backward(x, weight, m, global_invstd)
        ctx.count = n
        shape = (1, c, 1, 1)
        return (x - m.view(shape)) * (global_invstd * weight).view(shape) + bias.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        c = x.shape[1]
        shape = (1, c, 1, 1)
        xmu = x - mean.view(shape)
        # batch_norm_backward_reduce: local sums; the parameter gradients stay local (DDP averages them)
        sum_dy = dy.sum(dim=(0, 2, 3))
        sum_dy_xmu = (dy * xmu).sum(dim=(0, 2, 3))
        grad_weight, grad_bias = sum_dy_xmu * invstd, sum_dy.clone()
        both = torch.cat([sum_dy, sum_dy_xmu])
        tdist.all_reduce(both)
        sum_dy, sum_dy_xmu = both[:c], both[c:]
        # batch_norm_backward_elemt
        mean_dy, mean_dy_xmu = sum_dy / ctx.count, sum_dy_xmu / ctx.count
        factor_1 = invstd * invstd * mean_dy_xmu
        factor_2 = weight * invstd
        dx = (dy - mean_dy.view(shape) - xmu * factor_1.view(shape)) * factor_2.view(shape)
        return dx, grad_weight, grad_bias, None, None, None, None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """nn.SyncBatchNorm's forward: in training with several ranks the statistics of the whole
    global batch (SyncBN over the world, as USB's send_model_cuda converts every BN), else
    plain batch norm (one rank, or eval mode)."""

    def forward(self, x):
        if not (self.training and world() > 1):
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        return _SyncBN.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps,
                             self.momentum)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """nn.SyncBatchNorm.convert_sync_batchnorm: the same parameters and buffers in a SyncBN."""
    out = module
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm2d):
        out = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child))
    return out


class ResNet(torchvision.models.ResNet):
    """torchvision's ResNet (BasicBlock) with its `fc`, the small-input stem, and the forward of
    USB's nets: {'logits': fc(pooled feature), 'feat': pooled feature}."""

    def __init__(self, layers: list[int], num_classes: int):
        super().__init__(torchvision.models.resnet.BasicBlock, layers, num_classes=num_classes)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.maxpool = nn.Identity()

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        feat = torch.flatten(self.avgpool(x), 1)
        return {"logits": self.fc(feat), "feat": feat}

    def no_weight_decay(self) -> list[str]:
        """semilearn/nets/resnet/resnet.py: the names holding "bn" or "bias"."""
        return [n for n, _ in self.named_parameters() if "bn" in n or "bias" in n]


# --------------------------------------------------------------------------- core/utils, nets/utils

def param_groups_weight_decay(model: nn.Module, weight_decay: float, no_weight_decay_list=()) -> list[dict]:
    no_decay_names = set(no_weight_decay_list)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in no_decay_names:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def get_optimizer(net: nn.Module, lr: float, momentum: float, weight_decay: float, nesterov: bool = True,
                  bn_wd_skip: bool = True) -> torch.optim.SGD:
    no_decay = net.no_weight_decay() if hasattr(net, "no_weight_decay") and bn_wd_skip else []
    groups = param_groups_weight_decay(net, weight_decay, no_decay) if bn_wd_skip else \
        [{"params": [p for p in net.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


def cosine_factor(current_step: int, num_training_steps: int, num_cycles: float = 7.0 / 16.0,
                  num_warmup_steps: int = 0) -> float:
    """get_cosine_schedule_with_warmup's _lr_lambda: the factor of the base lr at a step."""
    if current_step < num_warmup_steps:
        return float(current_step) / float(max(1, num_warmup_steps))
    progress = float(current_step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    return max(0.0, math.cos(math.pi * num_cycles * progress))


def get_cosine_schedule_with_warmup(optimizer, num_training_steps: int, num_cycles: float = 7.0 / 16.0,
                                    num_warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_factor(step, num_training_steps, num_cycles, num_warmup_steps))


class EMA:
    """core/utils/misc.py `EMA`: a shadow of the model's parameters by name; `update` also copies
    the model's buffers into it."""

    def __init__(self, model: nn.Module, decay: float):
        self.model, self.decay = model, decay
        self.shadow: dict[str, torch.Tensor] = {}

    def register(self) -> None:
        for name, param in self.model.named_parameters():
            self.shadow[name] = param.data.clone()

    def update(self) -> None:
        for name, param in self.model.named_parameters():
            self.shadow[name] = ((1.0 - self.decay) * param.data + self.decay * self.shadow[name]).clone()
        for name, buffer in self.model.named_buffers():
            self.shadow[name] = buffer.clone()


# --------------------------------------------------------------------------- criterions

def ce_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    if logits.shape == targets.shape:
        nll = torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=1)
        return nll if reduction == "none" else nll.mean()
    return F.nll_loss(F.log_softmax(logits, dim=-1), targets, reduction=reduction)


def consistency_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    loss = ce_loss(logits, targets, reduction="none")  # name='ce'
    if mask is not None:
        loss = loss * mask
    return loss.mean()


# --------------------------------------------------------------------------- the algorithm

class USBFixMatch:
    """AlgorithmBase + FixMatch as USB trains it: `step` is one pass of `AlgorithmBase.train`'s
    loop body (train_step, then ParamUpdateHook and EMAHook). `net` is built by the caller (its
    initial weights set there); `p_cutoff`, `lambda_u` and `bn_wd_skip` can be changed for the
    test's controls."""

    def __init__(self, net: ResNet, make_net, num_train_iter: int, lr: float = RECIPE["lr"],
                 p_cutoff: float = RECIPE["p_cutoff"], lambda_u: float = RECIPE["ulb_loss_ratio"],
                 ema_m: float = RECIPE["ema_m"], bn_wd_skip: bool = True,
                 num_warmup_iter: int = RECIPE["num_warmup_iter"]):
        self.p_cutoff, self.lambda_u = p_cutoff, lambda_u
        self.T, self.use_hard_label = RECIPE["T"], RECIPE["hard_label"]  # T: soft labels only
        self.it = 0
        self.net = net
        # set_ema_model: a second network holding the model's state dict
        self.ema_net = make_net()
        self.ema_net.load_state_dict(net.state_dict())
        # set_optimizer: on the bare network (train.py wraps it in DDP afterwards)
        self.optimizer = get_optimizer(net, lr, RECIPE["momentum"], RECIPE["weight_decay"], RECIPE["nesterov"],
                                       bn_wd_skip)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, num_train_iter,
                                                         num_warmup_steps=num_warmup_iter)
        # train.py: send_model_cuda for the model and the ema model (distributed: SyncBN + DDP)
        self.model, self.ema_model = net, self.ema_net
        if world() > 1:
            self.model = self._distributed(net)
            self.ema_model = self._distributed(self.ema_net)
        # EMAHook.before_run, on the model as train.py left it
        self.ema = EMA(self.model, ema_m)
        self.ema.register()
        self.model.train()
        self.seen: dict = {}

    @staticmethod
    def _distributed(net: nn.Module) -> nn.Module:
        convert_sync_batchnorm(net)  # in place: the network's BN modules are the converted ones
        with warnings.catch_warnings():  # torch 2.14 names broadcast_buffers deprecated; USB's argument
            warnings.simplefilter("ignore", FutureWarning)
            return nn.parallel.DistributedDataParallel(net, broadcast_buffers=False, find_unused_parameters=True)

    # fixmatch.py
    def train_step(self, x_lb, y_lb, x_ulb_w, x_ulb_s) -> tuple[dict, dict]:
        num_lb = y_lb.shape[0]
        inputs = torch.cat((x_lb, x_ulb_w, x_ulb_s))  # use_cat
        outputs = self.model(inputs)
        logits_x_lb = outputs["logits"][:num_lb]
        logits_x_ulb_w, logits_x_ulb_s = outputs["logits"][num_lb:].chunk(2)
        sup_loss = ce_loss(logits_x_lb, y_lb, reduction="mean")
        probs_x_ulb_w = torch.softmax(logits_x_ulb_w.detach(), dim=-1)  # compute_prob
        with torch.no_grad():  # FixedThresholdingHook.masking, softmax_x_ulb=False
            max_probs, _ = torch.max(probs_x_ulb_w.detach(), dim=-1)
            mask = max_probs.ge(self.p_cutoff).to(max_probs.dtype)
        with torch.no_grad():  # PseudoLabelingHook.gen_ulb_targets, use_hard_label
            pseudo_label = torch.argmax(probs_x_ulb_w.detach(), dim=-1)
        unsup_loss = consistency_loss(logits_x_ulb_s, pseudo_label, mask=mask)
        total_loss = sup_loss + self.lambda_u * unsup_loss
        self.seen = {"logits": outputs["logits"].detach(), "probs": probs_x_ulb_w, "mask": mask,
                     "pseudo_label": pseudo_label}
        log = {"sup_loss": sup_loss.detach(), "unsup_loss": unsup_loss.detach(),
               "total_loss": total_loss.detach(), "util_ratio": mask.float().mean()}
        return {"loss": total_loss}, log

    # hooks/param_update.py (amp off, clip_grad 0)
    def param_update(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.seen["grads"] = {n: p.grad.clone() for n, p in self.net.named_parameters() if p.grad is not None}
        self.optimizer.step()
        self.scheduler.step()
        self.model.zero_grad()

    # hooks/ema.py
    def ema_update(self) -> None:
        self.ema.update()
        self.ema_model.load_state_dict(self.model.state_dict())
        self.ema_model.load_state_dict(self.ema.shadow, strict=False)

    def step(self, labeled: dict, unlabeled: dict) -> dict:
        """One iteration of AlgorithmBase.train on one rank's batches (the project's batch dicts)."""
        lr = self.optimizer.param_groups[0]["lr"]
        assert all(g["lr"] == lr for g in self.optimizer.param_groups)
        out, log = self.train_step(labeled["x"], labeled["y"], unlabeled["weak"], unlabeled["strong"][0])
        self.param_update(out["loss"])  # priority HIGHEST
        self.ema_update()  # HIGH
        self.it += 1
        return {"lr": lr, **log, **self.seen}
