"""FixMatch as Sohn et al.'s code trains it, ReMixMatch's alignment as its code does it, weight
decay on every parameter in the faithful configs, heads as the papers' code builds them, and
methods/choices from one registry and the config's Literal types."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, rank_losses

pytestmark = pytest.mark.timeout(120)


def derived(cfg):
    """What build_method reads from the derived recipe, at the config's own step size, L_in from the start."""
    from simmatch.config import derive_scale

    values = {**derive_scale(cfg, 1).method_values, "propagate_after_epochs": 0}
    return SimpleNamespace(ema_momentum=cfg.model.ema_momentum, method_values=values)


def tiny(name: str, *overrides: str):
    from simmatch.config import load_config

    return load_config(ROOT / "yaml" / name, ["model.arch=resnet10", "model.small_input=true",
                                              "data.num_classes=10", *overrides])


# --------------------------------------------------------------------------- FixMatch

def test_fixmatch_is_hard_thresholded_self_training_on_the_students_weak_view():
    from simmatch.methods import build_method
    from simmatch.methods.fixmatch.method import FixMatch

    torch.manual_seed(0)
    cfg = tiny("digits.yaml", "method.name=fixmatch", "method.fixmatch.lambda_u=2.0")
    assert cfg.method.params.tau == 0.95
    method = build_method(cfg, derived(cfg), torch.arange(40) % 10)
    assert isinstance(method, FixMatch) and method.student.head is None
    with torch.no_grad():
        method.student.backbone.fc.weight.mul_(30)  # some confident predictions
    method.train()
    g = torch.Generator().manual_seed(1)
    b, bu = 4, 8
    labeled = {"x": torch.randn(b, 3, 16, 16, generator=g), "y": torch.randint(0, 10, (b,), generator=g)}
    unlabeled = {"weak": torch.randn(bu, 3, 16, 16, generator=g), "strong": [torch.randn(bu, 3, 16, 16, generator=g)],
                 "y": torch.randint(0, 10, (bu,), generator=g)}
    ref_net = copy.deepcopy(method.student)
    with torch.no_grad():  # the teacher plays no part in training: spoil it
        for p in method.teacher.parameters():
            p.fill_(float("nan"))
    out = rank_losses(method, labeled, unlabeled, 0)
    out["loss"].backward()

    # reference, sample by sample: one forward over labeled + weak + strong (one BN batch)
    logits = ref_net(torch.cat([labeled["x"], unlabeled["weak"], unlabeled["strong"][0]]))[0]
    loss_x = sum(-F.log_softmax(logits[i], 0)[labeled["y"][i]] for i in range(b)) / b
    loss_u, used = 0.0, 0
    for i in range(bu):
        p = torch.softmax(logits[b + i].detach(), 0)
        if float(p.max()) >= 0.95:
            used += 1
            loss_u = loss_u - F.log_softmax(logits[b + bu + i], 0)[int(p.argmax())] / bu
    assert 0 < used < bu
    ref = loss_x + 2.0 * loss_u
    ref.backward()
    assert float(out["mask"]) == used / bu
    assert float(out["loss"].detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    for p, q in zip(method.student.parameters(), ref_net.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_simmatch_without_bank_is_a_switch():
    from simmatch.methods import build_method
    from simmatch.methods.simmatch.method import SimMatch

    cfg = tiny("digits.yaml", "method.simmatch.use_bank=false")
    m = build_method(cfg, derived(cfg), torch.arange(40) % 10)
    assert isinstance(m, SimMatch) and m.bank is None and m.lambda_in == 0.0 and m.da is not None


# --------------------------------------------------------------------------- ReMixMatch's DA

class RemixReference:
    """remixmatch_no_cta.py guess_label (use_dm, T) with libml/layers.py PMovingAverage and PData,
    transcribed in numpy-like steps: a buffer shifted by concatenation, p_data an EMA."""

    def __init__(self, nclass: int, dbuf: int = 128):
        self.ma = torch.ones(dbuf, nclass, dtype=torch.float64) / nclass
        self.p_data = torch.ones(nclass, dtype=torch.float64) / nclass

    def step(self, probs: torch.Tensor, labels: torch.Tensor, T: float = 0.5) -> torch.Tensor:
        p_model = self.ma.mean(0)
        p_model = p_model / p_model.sum()
        p_data = self.p_data / self.p_data.sum()
        p_ratio = (1e-6 + p_data) / (1e-6 + p_model)
        rows = []
        for i in range(probs.shape[0]):
            w = probs[i] * p_ratio
            w = w / w.sum()
            t = w ** (1.0 / T)
            rows.append(t / t.sum())
        # post_ops after the train step: p_model.update(guess.p_model), p_data.update(lx)
        self.ma = torch.cat([self.ma[1:], probs.mean(0, keepdim=True)], dim=0)
        lx = F.one_hot(labels, probs.shape[1]).double()
        self.p_data = self.p_data * 0.999 + lx.mean(0) * (1 - 0.999)
        return torch.stack(rows)


def test_remixmatch_alignment_matches_a_transcription_of_its_code():
    from simmatch.methods.alignment import ReMixMatchAlignment

    c, length = 5, 4  # a short buffer so the FIFO wraps within the test
    ours = ReMixMatchAlignment(c, length=length)
    ref = RemixReference(c, dbuf=length)
    g = torch.Generator().manual_seed(0)
    for _ in range(11):
        probs = torch.softmax(3 * torch.randn(6, c, generator=g), 1)
        labels = torch.randint(0, 2, (3,), generator=g)  # an unbalanced labeled stream
        got = ours(probs, labels)
        want = ref.step(probs.double(), labels)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(want, probs.double(), atol=1e-2)  # it did change the predictions


def test_da_target_labeled_builds_remixmatch_alignment_and_fixmatch_refuses_it():
    from simmatch.errors import ConfigError
    from simmatch.methods import build_method
    from simmatch.methods.alignment import DistributionAlignment, ReMixMatchAlignment

    cfg = tiny("digits.yaml", "method.simmatch.da_target=labeled")
    m = build_method(cfg, derived(cfg), torch.arange(40) % 10)
    assert isinstance(m.da, ReMixMatchAlignment) and m.da.p_model.shape == (128, 10) and m.da.temperature == 0.5
    cfg = tiny("digits.yaml")
    m = build_method(cfg, derived(cfg), torch.arange(40) % 10)
    assert type(m.da) is DistributionAlignment and m.da.queue.shape == (32, 10)
    with pytest.raises(ConfigError, match="method.simmatch.da_target is a key of method simmatch, but "
                                          "method.name=fixmatch"):
        tiny("digits.yaml", "method.name=fixmatch", "method.simmatch.da_target=labeled")


# --------------------------------------------------------------------------- weight decay, heads, teacher

@pytest.mark.parametrize("name", ["in1k_1pct.yaml", "in1k_10pct.yaml", "in1k_isd.yaml"])
def test_faithful_configs_decay_every_parameter(name):
    from simmatch.engine.optim import build_optimizer
    from simmatch.models import network_for

    isd = ["method.isd.predictor_hidden=32"] if "isd" in name else []
    cfg = tiny(name, "model.proj_dim=16", "model.proj_hidden=32", *isd)
    assert cfg.optim.decay_bn_bias and cfg.model.teacher == "ema_shuffle_bn"
    params = cfg.method.params
    net = network_for(cfg, head=True, predictor=(params.predictor_hidden, params.predictor_bn)
                      if hasattr(params, "predictor_hidden") else None)
    opt = build_optimizer(net, cfg, lr=0.1)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 1e-4
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in net.parameters()}
    # with a zero gradient one step shrinks a BN weight and a bias by the decay alone
    bn, bias = net.backbone.bn1.weight, net.backbone.fc.bias
    with torch.no_grad():
        bias.fill_(1.0)
    before = bn.detach().clone(), bias.detach().clone()
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    m = cfg.optim.momentum
    factor = 1 - 0.1 * 1e-4 * ((1 + m) if cfg.optim.nesterov else 1)
    torch.testing.assert_close(bn.detach(), before[0] * factor)
    torch.testing.assert_close(bias.detach(), before[1] * factor)


def test_heads_as_the_papers_code_builds_them():
    import torch.nn as nn

    from simmatch.config import load_config
    from simmatch.models import network_for

    def layers(seq):
        return [(type(m).__name__, getattr(m, "in_features", getattr(m, "num_features", None)),
                 getattr(m, "out_features", None)) for m in seq]

    simm = network_for(load_config(ROOT / "yaml" / "in1k_1pct.yaml"))
    assert layers(simm.head) == [("Linear", 2048, 2048), ("ReLU", None, None), ("Linear", 2048, 128)]
    isd_cfg = load_config(ROOT / "yaml" / "in1k_isd.yaml")
    isd = network_for(isd_cfg, head=True, predictor=(isd_cfg.method.params.predictor_hidden,
                                                     isd_cfg.method.params.predictor_bn))
    assert layers(isd.head) == [("Linear", 2048, 4096), ("BatchNorm1d", 4096, None), ("ReLU", None, None),
                                ("Linear", 4096, 512)]
    assert layers(isd.predictor) == [("Linear", 512, 4096), ("BatchNorm1d", 4096, None), ("ReLU", None, None),
                                     ("Linear", 4096, 512)]
    assert isd_cfg.model.ema_momentum == 0.99 and isd_cfg.model.teacher == "ema_shuffle_bn"
    assert not any(isinstance(m, nn.BatchNorm1d) for m in simm.head)


def test_parameter_only_ema_leaves_the_teachers_buffers_alone():
    from simmatch.models import EMA, build_network

    student = build_network("resnet10", 10, True, 8)
    teacher = EMA(student, 0.5, "ema_shuffle_bn")
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        for b in student.buffers():
            b.add_(3)
    old_t = [b.clone() for b in teacher.module.buffers()]
    old_p = [p.clone() for p in teacher.module.parameters()]
    teacher.update(student)
    assert all(torch.equal(a, b) for a, b in zip(old_t, teacher.module.buffers()))
    for a, p in zip(old_p, teacher.module.parameters()):
        torch.testing.assert_close(p, a + 0.5)
    teacher.train()
    assert teacher.module.training
    eman = EMA(student, 0.5, "eman").train()
    assert not eman.module.training


# --------------------------------------------------------------------------- registry and choices

def test_every_card_has_its_class():
    """Each built-in method's card names the module of its class, which registers under the card's
    name with its own from_config; the card and the class know each other."""
    import importlib

    from simmatch.methods import CARDS
    from simmatch.methods.card import CLASSES

    builtin = {"simmatch", "fixmatch", "supervised", "isd", "simmatchv2"}
    assert builtin <= set(CARDS)
    for name in builtin:
        importlib.import_module(CARDS[name].module)
        cls = CLASSES[name]
        assert "from_config" in vars(cls) and cls.card is CARDS[name]


@pytest.mark.parametrize("override,key", [("model.teacher=ema", "model.teacher"), ("train.amp=fp8", "train.amp"),
                                          ("method.name=mixmatch", "method.name")])
def test_a_choice_outside_its_literal_is_one_line_naming_key_and_choices(override, key):
    from simmatch.config import load_config
    from simmatch.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    text = str(info.value)
    assert key in text and "is not one of" in text and "\n" not in text


def test_a_choice_set_in_code_is_caught_by_validate():
    from simmatch.config import Config, validate
    from simmatch.errors import ConfigError

    cfg = Config()
    cfg.data.backend = "tensorflow"
    with pytest.raises(ConfigError, match="data.backend='tensorflow' is not one of dali, torch, synthetic"):
        validate(cfg)
