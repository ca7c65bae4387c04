"""ReMixMatch's augmentation anchoring: k strong views per unlabeled image, one target for all."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import rank_losses
from simmatch.methods.simmatch.method import SimMatch
from simmatch.models import build_network


def _batches(b: int, mu: int, views: int, classes: int, size: int = 16):
    g = torch.Generator().manual_seed(5)
    labeled = {"x": torch.randn(b, 3, size, size, generator=g),
               "y": torch.randint(0, classes, (b,), generator=g), "index": torch.arange(b)}
    unlabeled = {"weak": torch.randn(b * mu, 3, size, size, generator=g),
                 "strong": [torch.randn(b * mu, 3, size, size, generator=g) for _ in range(views)],
                 "y": torch.randint(0, classes, (b * mu,), generator=g)}
    return labeled, unlabeled


@pytest.mark.parametrize("views", [1, 2])
def test_every_strong_view_is_trained_on_the_weak_target(views):
    torch.manual_seed(0)
    classes, b, mu, lambda_u = 10, 4, 2, 2.0
    method = SimMatch(build_network("resnet10", classes, small_input=True, proj_dim=0), 0.99,
                      torch.arange(b) % classes, classes, tau=0.5, temperature=0.1, alpha=0.9,
                      lambda_u=lambda_u, lambda_in=0.0, dist_align=False, use_bank=False)
    labeled, unlabeled = _batches(b, mu, views, classes)
    student = copy.deepcopy(method.student)
    teacher = copy.deepcopy(method.teacher.module).eval()
    # reference: the teacher's weak-view softmax is the target of each strong view, sample by sample
    with torch.no_grad():
        target = torch.softmax(teacher(torch.cat([labeled["x"], unlabeled["weak"]]))[0][b:], dim=1)
        logits = student(torch.cat([labeled["x"], *unlabeled["strong"]]))[0]
    confidence = target.max(dim=1).values.sort().values
    tau = method.tau = float(confidence[2:4].mean())  # between the 3rd and 4th of 8: a mask of 5/8
    out = rank_losses(method, labeled, unlabeled, iteration=0)
    bu = b * mu
    loss_u = 0.0
    for k in range(views):
        for i in range(bu):
            if float(target[i].max()) >= tau:
                log_p = torch.log_softmax(logits[b + k * bu + i].double(), dim=0)
                loss_u += float(-(target[i].double() * log_p).sum()) / bu
    loss_u /= views
    loss_x = sum(float(-torch.log_softmax(logits[i].double(), 0)[labeled["y"][i]]) for i in range(b)) / b
    mask = float((target.max(dim=1).values >= tau).float().mean())
    assert mask == 5 / 8
    assert float(out["mask"]) == pytest.approx(mask)
    assert float(out["loss_u"]) == pytest.approx(loss_u, rel=1e-4)
    assert float(out["loss"].detach()) == pytest.approx(loss_x + lambda_u * loss_u, rel=1e-4)


def test_dali_stream_gives_two_strong_views(digits_root):
    pytest.importorskip("nvidia.dali")
    from conftest_data import data_cfg, streams_for

    s = streams_for(data_cfg(digits_root, "data.num_strong=2"), 0, 1, torch.device("cpu"))
    u = next(s.unlabeled)
    assert len(u["strong"]) == 2
    first, second = u["strong"]
    assert first.shape == second.shape == u["weak"].shape == (16, 3, 32, 32)
    assert (first - second).abs().mean() > 0.1 and (first - u["weak"]).abs().mean() > 0.1
    s.close()
