import copy

import torch

from simmatch.models import EMA, build_network


def _net():
    torch.manual_seed(0)
    return build_network("resnet18", 5, small_input=True, proj_dim=8)


def _perturb(net):
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
        for b in net.buffers():
            if b.is_floating_point():
                b.add_(1.0)
            else:
                b.add_(3)


def test_momentum_zero_copies():
    student = _net()
    ema = EMA(student, 0.0)
    _perturb(student)
    ema.update(student)
    for a, b in zip(ema.module.state_dict().values(), student.state_dict().values()):
        assert torch.equal(a, b)


def test_momentum_one_freezes():
    student = _net()
    ema = EMA(student, 1.0)
    before = copy.deepcopy(ema.module.state_dict())
    _perturb(student)
    ema.update(student)
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(v, before[k]), k


def test_blend_and_eval_mode():
    student = _net()
    ema = EMA(student, 0.75)
    t0 = [p.clone() for p in ema.module.parameters()]
    _perturb(student)
    ema.update(student)
    for t, before, s in zip(ema.module.parameters(), t0, student.parameters()):
        torch.testing.assert_close(t, 0.75 * before + 0.25 * s)
    ema.train()
    assert not ema.module.training
    assert not any(p.requires_grad for p in ema.module.parameters())
