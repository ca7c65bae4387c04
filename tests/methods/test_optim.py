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


def test_table1_fixmatch_cosine_is_usbs_schedule():
    """optim.schedule=fixmatch against USB's get_cosine_schedule_with_warmup (num_cycles 7/16, no
    warm-up in its classic CV configs), written out here: lr at step k = lr0 * max(0, cos(pi * 7/16
    * k / K)), as LambdaLR applies it before step k's update."""
    base, total = 0.03, 1 << 20

    def usb(step: int, warmup: int = 0) -> float:
        if step < warmup:
            return base * float(step) / float(max(1, warmup))
        progress = float(step - warmup) / float(max(1, total - warmup))
        return base * max(0.0, math.cos(math.pi * (7.0 / 16.0) * progress))

    for k in (0, 1, 1000, total // 2, total - 1, total):
        assert lr_at(k, base, 0, total, "fixmatch") == pytest.approx(usb(k), rel=1e-12, abs=1e-15)
    assert lr_at(total, base, 0, total, "fixmatch") == pytest.approx(base * math.cos(7 * math.pi / 16))
    assert lr_at(total // 2, base, 0, total, "fixmatch") != lr_at(total // 2, base, 0, total)  # not the cosine
