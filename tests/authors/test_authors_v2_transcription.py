"""tests/authors/authors_simmatchv2.py (the SimMatchV2 authors' step, transcribed) against answers computed
another way on tiny tensors: the graph pseudo-label by hand and by a power series over a loop-built
graph, the ring bank's wrap-around, DA and the relation losses by hand, shuffle-BN's round trip, the
EMA, the schedules and sizes of their recipe, and one whole step's writes."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
from authors_simmatchv2 import (
    RECIPE_1P,
    RECIPE_10P,
    Authors,
    Net,
    SimMatchV2,
    bank_size,
    ema_momentum,
    graph_pseudo_label,
    relation_losses,
    unlabeled_steps,
)

pytestmark = pytest.mark.timeout(120)


class TinyTrunk(nn.Module):
    """A trunk of the interface their models/simmatchv2.py expects: no `fc`, `out_channels`."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_channels = 8

    def forward(self, x):
        return self.body(x)


def tiny_model(num_labeled=8, classes=3, K=8, **hp) -> SimMatchV2:
    torch.manual_seed(0)
    labels = torch.arange(num_labeled) % classes
    return SimMatchV2(TinyTrunk, classes, labels, K, {**RECIPE_1P, "dim": 4, "topn": 4, **hp})


def loop_graph(feat, prob, bank, onehot, topn, t, alpha, terms=200, self_loops=False):
    """The pseudo-label another way: neighbours by a sort, A entry by entry with math.exp, and the
    series (1 - alpha) sum_s alpha^s A^s instead of the inverse; float64."""
    out = []
    for i in range(feat.shape[0]):
        sims = [float(feat[i] @ bank[j]) for j in range(bank.shape[0])]
        near = sorted(range(len(sims)), key=lambda j: -sims[j])[:topn]
        nodes = [feat[i].double()] + [bank[j].double() for j in near]
        labels = torch.stack([prob[i].double()] + [onehot[j].double() for j in near])
        n = len(nodes)
        A = torch.zeros(n, n, dtype=torch.float64)
        for a in range(n):
            w = [0.0 if (a == b and not self_loops) else math.exp(float(nodes[a] @ nodes[b]) / t) for b in range(n)]
            for b in range(n):
                A[a, b] = w[b] / sum(w)
        total, power = torch.zeros(n, n, dtype=torch.float64), torch.eye(n, dtype=torch.float64)
        for s in range(terms):
            total += (1 - alpha) * alpha ** s * power
            power = power @ A
        out.append(total[0] @ labels)
    return torch.stack(out)


def test_authors_v2_graph_of_two_nodes_by_hand():
    """topn = 1: A = [[0, 1], [1, 0]], so the first row of (1 - a)(I - aA)^-1 is [1, a] / (1 + a):
    the pseudo-label is (p + a y) / (1 + a) of the nearest labeled neighbour, the far one unseen."""
    a = 0.1
    feat = torch.tensor([[1.0, 0.0]])
    bank = torch.tensor([[0.8, 0.6], [-1.0, 0.0], [0.0, -1.0]])  # the first is nearest
    onehot = torch.eye(3)[[1, 2, 2]]
    prob = torch.tensor([[0.6, 0.4, 0.0]])
    got = graph_pseudo_label(feat, prob, bank, onehot, topn=1, t=0.1, alpha=a)
    want = torch.tensor([[0.6 / 1.1, 0.5 / 1.1, 0.0]])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - prob).abs().max() > 1e-2  # control: the neighbour moves it


@pytest.mark.parametrize("alpha", [0.1, 0.6])
def test_authors_v2_graph_equals_the_power_series_of_a_loop_built_graph(alpha):
    g = torch.Generator().manual_seed(3)
    feat = torch.nn.functional.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=1)
    bank = torch.nn.functional.normalize(torch.randn(10, 4, generator=g, dtype=torch.float64), dim=1)
    onehot = torch.eye(5, dtype=torch.float64)[torch.randint(0, 5, (10,), generator=g)]
    prob = torch.softmax(torch.randn(3, 5, generator=g, dtype=torch.float64), dim=1)
    got = graph_pseudo_label(feat, prob, bank, onehot, topn=4, t=0.5, alpha=alpha)
    want = loop_graph(feat, prob, bank, onehot, topn=4, t=0.5, alpha=alpha)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(got.sum(1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    # controls: self loops, or other neighbours (topn 5), give answers outside the tolerance
    assert (loop_graph(feat, prob, bank, onehot, 4, 0.5, alpha, self_loops=True) - got).abs().max() > 1e-4
    assert (loop_graph(feat, prob, bank, onehot, 5, 0.5, alpha) - got).abs().max() > 1e-4


def test_authors_v2_graph_in_float32_at_their_temperature():
    """t = 0.1 and topn 128 of their recipe, in fp32 (their no-fp16 path): within 1e-5 of float64."""
    g = torch.Generator().manual_seed(5)
    feat = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=1)
    bank = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    onehot = torch.eye(10)[torch.randint(0, 10, (300,), generator=g)]
    prob = torch.softmax(3 * torch.randn(4, 10, generator=g), dim=1)
    got = graph_pseudo_label(feat, prob, bank, onehot, topn=128, t=0.1, alpha=0.1)
    want = graph_pseudo_label(feat.double(), prob.double(), bank.double(), onehot.double(), 128, 0.1, 0.1)
    assert (got.double() - want).abs().max() < 1e-5
    assert (got.double() - prob.double()).abs().max() > 1e-3  # control


def test_authors_v2_unlabeled_ring_bank_wraps_around():
    model = tiny_model(K=6)
    written = []
    for s in range(4):
        feat = torch.full((2, 4), float(s + 1))
        prob = torch.full((2, 3), float(10 * (s + 1)))
        model.write_unlabeled(feat, prob)
        written.append(int(model.ptr[0]))
    assert written == [2, 4, 0, 2]
    # slots 0-1 hold the 4th batch (the 1st overwritten), 2-3 the 2nd, 4-5 the 3rd
    assert model.u_bank[:, 0].tolist() == [4, 4, 2, 2, 3, 3]
    assert model.u_labels[:, 0].tolist() == [40, 40, 20, 20, 30, 30]
    with pytest.raises(AssertionError):  # their assert: K a multiple of the global batch
        tiny_model(K=5).write_unlabeled(torch.zeros(2, 4), torch.zeros(2, 3))


def test_authors_v2_labeled_bank_rows_and_labels():
    model = tiny_model(num_labeled=8)
    assert model.l_labels.argmax(1).tolist() == [0, 1, 2, 0, 1, 2, 0, 1] and model.l_labels.sum().item() == 8
    torch.testing.assert_close(model.l_bank.norm(dim=1), torch.ones(8))
    before = model.l_bank.clone()
    model.write_labeled(torch.full((2, 4), 7.0), torch.tensor([5, 1]))
    changed = (model.l_bank != before).any(1).nonzero().flatten().tolist()
    assert changed == [1, 5] and (model.l_bank[[1, 5]] == 7).all()


def test_authors_v2_distribution_alignment_by_hand():
    """Divide by the running mean as it was, then mean <- 0.9 mean + 0.1 batch mean (raw)."""
    model = tiny_model(classes=2)
    first = torch.tensor([[0.8, 0.2], [0.4, 0.6]])
    torch.testing.assert_close(model.distribution_alignment(first), first)  # uniform start: identity
    torch.testing.assert_close(model.da, torch.tensor([[0.51, 0.49]]))
    out = model.distribution_alignment(torch.tensor([[0.5, 0.5]]))
    torch.testing.assert_close(out, torch.tensor([[0.49, 0.51]]))
    torch.testing.assert_close(model.da, torch.tensor([[0.509, 0.491]]))


def test_authors_v2_relation_losses_by_hand():
    """Two bank slots e1, e2; the weak embedding e1; strong views e2 and e1; one-hot bank rows."""
    t = 0.5
    u_bank, u_labels = torch.eye(2), torch.eye(2)
    weak = torch.tensor([[1.0, 0.0]])
    relation_ku = torch.softmax(weak @ u_bank.T / t, dim=1)
    prob = torch.tensor([[0.7, 0.3]])
    views = [torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])]
    ee, ne = relation_losses(views, relation_ku, prob, u_bank, u_labels, t, "cpu")
    hi, lo = math.exp(1 / t) / (math.exp(1 / t) + 1), 1 / (math.exp(1 / t) + 1)
    ee_views = [-(hi * math.log(lo) + lo * math.log(hi)), -(hi * math.log(hi) + lo * math.log(lo))]
    ne_views = [-(0.7 * math.log(lo) + 0.3 * math.log(hi)), -(0.7 * math.log(hi) + 0.3 * math.log(lo))]
    assert abs(ee.item() - sum(ee_views) / 2) < 1e-6 and abs(ne.item() - sum(ne_views) / 2) < 1e-6
    assert abs(ee.item() - ee_views[0]) > 0.1  # control: the mean over views, not the first view
    # their start: u_labels all zero, so relation @ u_labels = 0, ne = inf, replaced by zeros(1)
    ee0, ne0 = relation_losses(views, relation_ku, prob, u_bank, torch.zeros(2, 2), t, "cpu")
    assert ne0.shape == (1,) and ne0.item() == 0 and abs(ee0.item() - ee.item()) < 1e-7


def test_authors_v2_shuffle_bn_round_trip_in_one_process():
    model = tiny_model()
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        direct = model.ema(x)[1]
        shuffled, back = model.shuffle(x, perm)
        assert torch.equal(shuffled, x[perm])
        out = model.ema(shuffled)[1]
        torch.testing.assert_close(model.unshuffle(out, back), direct, rtol=0, atol=1e-6)
        assert (out - direct).abs().max() > 1e-2  # control: not unshuffled


def test_authors_v2_network_and_ema():
    net = Net(TinyTrunk, 3, 4, norm_feat=True)
    assert isinstance(net.norm, nn.LayerNorm) and net.norm.normalized_shape == (8,)
    assert [tuple(m.weight.shape) for m in net.head if isinstance(m, nn.Linear)] == [(8, 8), (4, 8)]
    assert isinstance(Net(TinyTrunk, 3, 4, norm_feat=False).norm, nn.Identity)
    logits, emb = net(torch.randn(2, 3, 8, 8))
    assert logits.shape == (2, 3)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    for eman in (False, True):
        model = tiny_model(eman=eman)
        with torch.no_grad():
            for p in model.main.parameters():
                p.add_(1.0)
            model.main(torch.randn(4, 3, 8, 8))  # no-grad train-mode forward: moves main's BN buffers
        ema_before = copy.deepcopy(model.ema.state_dict())
        main_now = model.main.state_dict()
        model.momentum_update_ema(0.9)
        for name, v in model.ema.state_dict().items():
            mixed = 0.9 * ema_before[name] + 0.1 * main_now[name] if v.is_floating_point() else main_now[name]
            params_only = "running" not in name and "num_batches" not in name
            want = mixed if (eman or params_only) else ema_before[name]
            torch.testing.assert_close(v, want, rtol=0, atol=1e-6, msg=f"{name} eman={eman}")
    assert ema_momentum(0.999, 5, 10) == 0.999
    assert ema_momentum(0.99, 0, 10) == pytest.approx(0.99) and ema_momentum(0.99, 10, 10) == pytest.approx(1.0)
    assert ema_momentum(0.99, 5, 10) == pytest.approx(0.995)


def test_authors_v2_recipe_sizes_and_lr():
    assert bank_size(RECIPE_1P["k"], RECIPE_1P["batch_size"], RECIPE_1P["mu"], 8) == 81_920
    # unlabeled = the train set (1,281,167) minus their labeled lists (12,811 / 128,116)
    assert unlabeled_steps(1_281_167 - 12_811, 8, 8, 5) == 3963
    assert unlabeled_steps(1_281_167 - 128_116, 8, 8, 5) == 3603
    assert (RECIPE_10P["lambda_ee"], RECIPE_10P["lambda_ne"], RECIPE_1P["lambda_ee"]) == (5.0, 5.0, 10.0)
    authors = Authors(tiny_model(), steps_per_epoch=10)
    lr = RECIPE_1P["lr"]
    assert authors.set_lr(0, 0) == pytest.approx(lr / 50)
    assert authors.set_lr(4, 9) == pytest.approx(lr)
    assert authors.set_lr(5, 0) == pytest.approx(lr)
    assert authors.set_lr(5, 7) == pytest.approx(lr)  # cosine set once per epoch
    assert authors.set_lr(299, 0) == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 294 / 295)))


def test_authors_v2_one_step_writes_banks_and_updates_the_teacher():
    """Two steps in one process: the banks take the teacher's embeddings and DA'd probabilities
    computed apart (a copy of the teacher, train mode), the EMA moves by 0.001, ne is zeroed at the
    first step only (u_labels start at zero), nn's mask is the DA'd teacher probability's."""
    model = tiny_model(K=8, threshold=0.4)
    authors = Authors(model, steps_per_epoch=10)
    g = torch.Generator().manual_seed(7)
    outs = []
    for step in range(2):
        labeled = {"x": torch.randn(2, 3, 8, 8, generator=g), "y": torch.tensor([0, 2]),
                   "index": torch.tensor([3 + step, 6])}
        unlabeled = {"weak": torch.randn(4, 3, 8, 8, generator=g),
                     "strong": [torch.randn(4, 3, s, s, generator=g) for s in (8, 6, 4)]}
        teacher, main_before = copy.deepcopy(model.ema), copy.deepcopy(model.main)
        with torch.no_grad():
            logits_k, feat_k = teacher(torch.cat([labeled["x"], unlabeled["weak"]]))
        da_before = model.da.clone()
        out = authors.step(0, step, labeled, unlabeled, idx_shuffle=torch.randperm(6, generator=g))
        outs.append(out)
        prob = torch.softmax(logits_k[2:], dim=1) / da_before
        prob = prob / prob.sum(1, keepdim=True)
        torch.testing.assert_close(out["prob_ku"], prob, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.l_bank[labeled["index"]], feat_k[:2], rtol=0, atol=1e-5)
        torch.testing.assert_close(model.u_bank[4 * step:4 * step + 4], feat_k[2:], rtol=0, atol=1e-5)
        torch.testing.assert_close(model.u_labels[4 * step:4 * step + 4], prob, rtol=0, atol=1e-5)
        assert int(model.ptr[0]) == (4 * step + 4) % 8
        mask = (prob.max(1).values >= 0.4).float().mean()
        assert abs(out["mask"].item() - mask.item()) < 1e-6
        for p_ema, p_old, p_new in zip(model.ema.parameters(), teacher.parameters(), model.main.parameters()):
            torch.testing.assert_close(p_ema, 0.999 * p_old + 0.001 * p_new, rtol=0, atol=1e-6)
        assert any((p - q).abs().max() > 0 for p, q in zip(model.main.parameters(), main_before.parameters()))
    assert outs[0]["loss_ne"].shape == (1,) and outs[0]["loss_ne"].item() == 0 and outs[0]["loss"].shape == (1,)
    assert math.isfinite(outs[1]["loss_ne"].item()) and outs[1]["loss_ne"].item() > 0
    assert outs[0]["lr"] == pytest.approx(RECIPE_1P["lr"] / 50)
