import math

import pytest

from simmatch.config import load_config
from simmatch.engine.optim import build_optimizer, lr_at
from simmatch.models import build_network


def test_schedule_warmup_then_cosine():
    base, warm, total = 0.4, 10, 110
    assert lr_at(0, base, warm, total) == pytest.approx(0.04)
    assert lr_at(9, base, warm, total) == pytest.approx(0.4)
    assert lr_at(10, base, warm, total) == pytest.approx(0.4)
    assert lr_at(60, base, warm, total) == pytest.approx(0.2)
    assert lr_at(35, base, warm, total) == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_at(110, base, warm, total) == pytest.approx(0.0)


def test_no_decay_on_bn_and_bias():
    net = build_network("resnet18", 10, True, 16)
    cfg = load_config(None, ["optim.weight_decay=0.1"])
    opt = build_optimizer(net, cfg, 0.1)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert id(net.backbone.conv1.weight) in decayed
    assert id(net.backbone.bn1.weight) not in decayed and id(net.backbone.fc.bias) not in decayed
    assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.9
    cfg = load_config(None, ["optim.decay_bn_bias=true"])
    opt = build_optimizer(net, cfg, 0.1)
    assert len(opt.param_groups) == 1
    assert sum(p.numel() for p in opt.param_groups[0]["params"]) == sum(p.numel() for p in net.parameters())
