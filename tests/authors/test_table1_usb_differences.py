"""The known differences between the project's SimMatch CIFAR step and USB's code, each measured
(tests/authors/test_table1_usb_simmatch.py compares the steps; its docstring lists them): USB's
bank line, USB's DA epsilon, and the head's zero gradient before L_in that both sides share."""
from __future__ import annotations

import torch
from test_table1_usb_simmatch import CLASSES, ITERS, LIN_START, PROJ, TOL, K, make_batches, rel
from usb_simmatch import (
    RECIPE,
    Backbone,
    DistAlignQueue,
    SimMatchNet,
    UsbSimMatch,
    per_sample_bank_update,
    usb_bank_update,
)


def test_table1_usb_bank_line_differs():
    """USB's update_bank line as written normalises each feature dimension across the batch's
    samples; the project (LabeledBank.update) and the reference normalise each sample's row."""
    from simmatch.methods.bank import LabeledBank

    g = torch.Generator().manual_seed(3)
    project = LabeledBank(K, PROJ, torch.arange(K) % CLASSES, momentum=RECIPE["ema_bank"])
    start = project.features.T.clone()  # [proj, K], USB's layout
    index = torch.tensor([3, 11, 0, 7, 19])
    k = torch.nn.functional.normalize(torch.randn(len(index), PROJ, generator=g), dim=1)
    project.update(k, torch.zeros(len(index), dtype=torch.long), index)
    per_sample, literal = start.clone(), start.clone()
    per_sample_bank_update(per_sample, k, index, RECIPE["ema_bank"])
    usb_bank_update(literal, k, index, RECIPE["ema_bank"])
    assert rel(project.features.T, per_sample) < 1e-6
    torch.testing.assert_close(per_sample.norm(dim=0), torch.ones(K))
    written = literal[:, index]
    assert (written.norm(dim=0) - 1).abs().max() > 0.1  # USB's written columns are not unit vectors
    torch.testing.assert_close(written.norm(dim=1), torch.ones(PROJ))  # its rows (dimensions) are
    assert rel(literal, per_sample) > 0.1


def test_table1_usb_da_eps():
    """The size of USB's 1e-6 in the DA: the project's DistributionAlignment (the mean of the written
    rows) against USB's queue hook (the mean of all rows + 1e-6) from an empty queue on one stream
    of batch probabilities. The difference is largest while the queue fills (USB's mean over 32
    rows is then small beside 1e-6) and falls under the tolerance once it is full."""
    from simmatch.methods.alignment import DistributionAlignment

    g = torch.Generator().manual_seed(5)
    length = RECIPE["da_len"]
    project, usb = DistributionAlignment(CLASSES, length), DistAlignQueue(CLASSES, length)
    diffs = []
    for _ in range(length + 4):
        probs = torch.softmax(3 * torch.randn(16, CLASSES, generator=g), dim=1)
        diffs.append(rel(project(probs), usb.dist_align(probs)))
    print("DA relative difference per step:", [f"{d:.1e}" for d in diffs])
    assert 1e-5 < diffs[0] < 1e-3  # one row of 32 written
    assert all(d < TOL for d in diffs[length - 1:])  # full
    assert diffs[length - 1] < diffs[0] / 10


def test_table1_usb_head_before_lin():
    """USB's literal epoch 0: in_loss * 0.0 gives the head a zero gradient (not none), so SGD's
    weight decay and momentum move its weights: w <- w (1 - lr wd (1 + momentum)) at the first
    Nesterov step, its biases (no decay) unchanged; the project's own-targets path does the same
    (compared step by step above)."""
    torch.manual_seed(0)
    net = SimMatchNet(Backbone([1, 1, 1, 1], CLASSES), PROJ)
    algo = UsbSimMatch(net, CLASSES, K, ITERS, iters_per_epoch=LIN_START)
    algo.start(SimMatchNet(Backbone([1, 1, 1, 1], CLASSES), PROJ))
    labeled, unlabeled = make_batches(0, 1, torch.arange(K) % CLASSES)
    head = {n: p.detach().clone() for n, p in net.mlp_proj.named_parameters()}
    out = algo.step(labeled[0], unlabeled[0])
    r = RECIPE
    for n, p in net.mlp_proj.named_parameters():
        grad = out["grads"][f"mlp_proj.{n}"]
        assert grad is not None and not grad.any(), n  # zero, and present
        expect = head[n] * (1 - r["lr"] * r["weight_decay"] * (1 + r["momentum"])) if p.ndim > 1 else head[n]
        torch.testing.assert_close(p.detach(), expect, rtol=1e-6, atol=0)
        if p.ndim > 1:
            assert rel(p, head[n]) > 2e-5
