"""BN pooled over groups of ranks: 4 real gloo processes in groups of 2 against one process
that runs plain BatchNorm on each group's concatenated batch."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from simmatch.models.group_bn import GroupBatchNorm, convert_group_bn

WORLD, GROUP, C = 4, 2, 3


def _data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-specific input (different batch sizes per rank) and upstream gradient."""
    g = torch.Generator().manual_seed(100 + rank)
    n = 2 + rank  # uneven batches: the pooled count must be the group's total
    x = torch.randn(n, C, 3, 2, generator=g) * (1.0 + rank) + rank
    dy = torch.randn(n, C, 3, 2, generator=g)
    return x, dy


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C))
    with torch.no_grad():
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.5, 0.5)
    return m


def _worker(rank: int, world: int) -> dict:
    from simmatch import distributed as sdist

    model = _model()
    convert_group_bn(model, sdist.bn_group(GROUP), "cpu")
    assert isinstance(model[1], GroupBatchNorm)
    x, dy = _data(rank)
    x.requires_grad_(True)
    y = model(x)
    y.backward(dy)
    bn = model[1]
    return {"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
            "dconv": model[0].weight.grad, "mean": bn.running_mean.clone(), "var": bn.running_var.clone()}


@pytest.mark.slow
def test_group_bn_matches_single_process_reference(gloo, tmp_path):
    results = gloo(_worker, WORLD, tmp_path)
    for first in range(0, WORLD, GROUP):
        ranks = list(range(first, first + GROUP))
        model = _model()  # the reference: plain BN over the group's whole batch, one process
        xs, dys = zip(*(_data(r) for r in ranks))
        x = torch.cat(xs).requires_grad_(True)
        y = model(x)
        y.backward(torch.cat(dys))
        sizes = [len(t) for t in xs]
        for r, y_ref, dx_ref in zip(ranks, y.detach().split(sizes), x.grad.split(sizes)):
            got = results[r]
            torch.testing.assert_close(got["y"], y_ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got["dx"], dx_ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got["mean"], model[1].running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got["var"], model[1].running_var, rtol=1e-5, atol=1e-6)
        # parameter gradients stay per rank (DDP sums them); over the group they are the reference's
        for key, ref in (("dw", model[1].weight.grad), ("db", model[1].bias.grad),
                         ("dconv", model[0].weight.grad)):
            torch.testing.assert_close(sum(results[r][key] for r in ranks), ref, rtol=1e-5, atol=1e-5)
    # the two groups really normalised with different statistics
    assert not torch.allclose(results[0]["mean"], results[2]["mean"])


def test_eval_mode_and_no_group_are_plain_batchnorm():
    torch.manual_seed(1)
    ref = nn.BatchNorm2d(C)
    ref.running_mean.uniform_(-1, 1)
    got = convert_group_bn(nn.Sequential(ref), None, "cpu")[0]
    assert isinstance(got, GroupBatchNorm) and got.running_mean is ref.running_mean
    x = torch.randn(4, C, 2, 2)
    got.eval()
    torch.testing.assert_close(got(x), nn.functional.batch_norm(
        x, ref.running_mean, ref.running_var, ref.weight, ref.bias, False, 0.0, ref.eps))
