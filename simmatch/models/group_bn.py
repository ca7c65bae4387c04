"""Batch normalisation whose statistics are pooled over a group of ranks.

With a fixed global batch on many GPUs each rank holds few images; pooling BN over groups of
ranks (train.bn_group_ranks) gives every BN batch the paper's size again. On CUDA this is
torch.nn.SyncBatchNorm with a process group. SyncBatchNorm refuses CPU tensors (torch 2.14:
"expected input tensor to be on GPU"), so CPU runs (gloo) use `GroupBatchNorm` below: the
same arithmetic with plain all-reduces, exact in float64 accumulation.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


class _GroupBNFunction(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * w + b with mean/var over the whole group's batch."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, group):
        dims = [0, *range(2, x.ndim)]
        xd = x.double()
        local = torch.cat([xd.sum(dims), (xd * xd).sum(dims),
                           xd.new_tensor([x.numel() / x.shape[1]])])
        dist.all_reduce(local, group=group)
        c = x.shape[1]
        count = local[-1]
        mean = local[:c] / count
        var = (local[c:2 * c] / count - mean * mean).clamp_(min=0.0)  # biased, as BN normalises
        shape = [1, c] + [1] * (x.ndim - 2)
        invstd = torch.rsqrt(var + eps)
        xhat = ((xd - mean.view(shape)) * invstd.view(shape)).to(x.dtype)
        ctx.save_for_backward(xhat, weight, invstd.to(x.dtype))
        ctx.group, ctx.count = group, count
        y = xhat * weight.view(shape) + bias.view(shape) if weight is not None else xhat
        mean, var = mean.to(x.dtype), var.to(x.dtype)
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dcount):
        xhat, weight, invstd = ctx.saved_tensors
        dims = [0, *range(2, dy.ndim)]
        c = dy.shape[1]
        shape = [1, c] + [1] * (dy.ndim - 2)
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * xhat).sum(dims)
        pooled = torch.cat([sum_dy, sum_dy_xhat]).double()
        dist.all_reduce(pooled, group=ctx.group)  # the group's batch shares mean and variance
        mean_dy = (pooled[:c] / ctx.count).to(dy.dtype)
        mean_dy_xhat = (pooled[c:] / ctx.count).to(dy.dtype)
        scale = invstd if weight is None else invstd * weight
        dx = (dy - mean_dy.view(shape) - xhat * mean_dy_xhat.view(shape)) * scale.view(shape)
        # parameter gradients stay local: DDP sums (averages) them over every rank afterwards
        dw = sum_dy_xhat if weight is not None else None
        db = sum_dy if weight is not None else None
        return dx, dw, db, None, None


class GroupBatchNorm(_BatchNorm):
    """BatchNorm (any input rank >= 2) with statistics over `process_group`, for CPU runs."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.ndim < 2:
            raise ValueError(f"expected at least 2D input (got {x.ndim}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        y, mean, var, count = _GroupBNFunction.apply(x, self.weight, self.bias, self.eps,
                                                     self.process_group)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                n = float(count)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                unbiased = var * (n / max(n - 1.0, 1.0))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        return y


def convert_group_bn(module: nn.Module, process_group, device_type: str) -> nn.Module:
    """Replace every BatchNorm of `module` (in place where it has children) by a group BN over
    `process_group`: SyncBatchNorm on CUDA, GroupBatchNorm elsewhere. Parameters and buffers
    are the same tensors, so optimizers and EMA copies made from them stay valid."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, GroupBatchNorm):
        out = GroupBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats, process_group)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_group_bn(child, process_group, device_type))
    return out
