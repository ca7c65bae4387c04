"""ReMixMatch's parts against hand-worked answers: the interleaving of the MixUp batches, the rotation
by quarters, TensorFlow's Adam with decoupled decay, BN forwards that leave the running statistics,
the constant schedule, and the recipe blocks a config applies when method.name=remixmatch."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from simmatch.config import load_config
from simmatch.engine.optim import DecoupledAdam, lr_at
from simmatch.errors import ConfigError
from simmatch.methods.remixmatch.method import interleave, interleave_offsets, rotate_quarters, still_bn

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def test_remixmatch_interleave_offsets_put_the_remainder_last():
    # 10 rows in 4 groups: 2, 2, 3, 3 (the groups from the end take one more each)
    assert interleave_offsets(10, 3) == [0, 2, 4, 7, 10]
    assert interleave_offsets(8, 1) == [0, 4, 8]


def test_remixmatch_interleave_swaps_group_i_of_batch_0_with_batch_i():
    batches = [torch.arange(6) + 10 * i for i in range(3)]  # rows 0..5, 10..15, 20..25; groups of 2
    mixed = interleave(batches, 6)
    assert mixed[0].tolist() == [0, 1, 12, 13, 24, 25]
    assert mixed[1].tolist() == [10, 11, 2, 3, 14, 15]
    assert mixed[2].tolist() == [20, 21, 22, 23, 4, 5]
    assert [t.tolist() for t in interleave(mixed, 6)] == [t.tolist() for t in batches]  # its own inverse


def test_remixmatch_rotation_quarters_are_the_codes_angles():
    img = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # H x W
    x = img.expand(8, 1, 2, 2).clone()
    rotated, labels = rotate_quarters(x)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # TF NHWC: x[b4:, ::-1, ::-1] (180 degrees); xt = transpose(H, W): xt[::-1] and xt[:, ::-1]
    expect = {0: [[1, 2], [3, 4]], 1: [[4, 3], [2, 1]], 2: [[2, 4], [1, 3]], 3: [[3, 1], [4, 2]]}
    for row, label in enumerate(labels.tolist()):
        assert rotated[row, 0].tolist() == expect[label]


def tf_adam_reference(w: float, grads: list[float], lr: float, wd: float) -> float:
    """tf.train.AdamOptimizer's update written out for one scalar, then w <- w (1 - wd lr)."""
    m = v = 0.0
    for t, g in enumerate(grads, start=1):
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        lr_t = lr * math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
        w = w - lr_t * m / (math.sqrt(v) + 1e-8)
        w = w * (1 - wd * lr)
    return w


def test_remixmatch_adam_is_tensorflows_with_decay_after_the_step():
    grads = [0.5, -1e-6, 2.0, 3e-7]  # tiny gradients: where eps's place matters
    weight = torch.nn.Parameter(torch.tensor([[0.3]], dtype=torch.float64))
    bias = torch.nn.Parameter(torch.tensor([0.3], dtype=torch.float64))
    opt = DecoupledAdam([{"params": [weight], "weight_decay": 0.02}, {"params": [bias], "weight_decay": 0.0}],
                        lr=0.002)
    for g in grads:
        weight.grad = torch.tensor([[g]], dtype=torch.float64)
        bias.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
    assert weight.item() == pytest.approx(tf_adam_reference(0.3, grads, 0.002, 0.02), rel=1e-12, abs=0)
    assert bias.item() == pytest.approx(tf_adam_reference(0.3, grads, 0.002, 0.0), rel=1e-12, abs=0)
    # torch's own Adam differs here (eps inside the bias correction): the reference would catch it
    other = torch.nn.Parameter(torch.tensor([0.3], dtype=torch.float64))
    torch_adam = torch.optim.Adam([other], lr=0.002)
    for g in grads:
        other.grad = torch.tensor([g], dtype=torch.float64)
        torch_adam.step()
    assert other.item() != pytest.approx(tf_adam_reference(0.3, grads, 0.002, 0.0), rel=1e-9, abs=0)


def test_remixmatch_still_bn_leaves_the_running_statistics_exactly():
    bn = nn.BatchNorm2d(3, momentum=0.001)
    bn.running_mean.fill_(0.25)
    before = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(4, 3, 2, 2) * 5 + 2
    with still_bn(bn):
        out = bn(x)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == 0
    assert bn.momentum == 0.001  # restored
    assert torch.allclose(out.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)  # still the batch's statistics
    bn(x)
    assert not torch.equal(bn.running_mean, before[0])


def test_remixmatch_constant_schedule_keeps_the_lr():
    assert [lr_at(i, 0.002, 0, 100, "constant") for i in (0, 50, 99)] == [0.002] * 3


def test_remixmatch_recipe_block_applies_only_when_chosen(tmp_path):
    base = ROOT / "yaml" / "cifar10_40.yaml"
    fix = load_config(base, [f"data.root={tmp_path}", "method.name=fixmatch"])
    assert (fix.optim.name, fix.train.mu, fix.data.num_strong) == ("sgd", 7, 1)
    rmm = load_config(base, [f"data.root={tmp_path}", "method.name=remixmatch"])
    assert (rmm.optim.name, rmm.optim.lr, rmm.optim.weight_decay, rmm.optim.schedule) == ("adam", 0.002, 0.02,
                                                                                          "constant")
    assert (rmm.train.mu, rmm.data.num_strong, rmm.data.randaug_n, rmm.data.cutout) == (1, 8, 0, False)
    assert (rmm.method.params.lambda_rot, rmm.method.params.rampup_iters) == (0.5, 16384)  # the paper's
    stl = load_config(ROOT / "yaml" / "stl10_1000.yaml", [f"data.root={tmp_path}", "method.name=remixmatch"])
    assert stl.data.num_strong == 4  # its STL-10 run
    cpu = load_config(ROOT / "yaml" / "digits_table1.yaml", ["method.name=remixmatch"])
    assert (cpu.data.num_strong, cpu.method.params.lambda_rot, cpu.method.params.rampup_iters) == (1, 2.0, 100)
    # the command line still has the last word
    mine = load_config(base, [f"data.root={tmp_path}", "method.name=remixmatch", "data.num_strong=4"])
    assert mine.data.num_strong == 4


def test_remixmatch_recipe_block_keys_are_checked(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("with_method:\n  remixmatch:\n    optim:\n      lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"with_method.remixmatch.*unknown config key 'optim.lrr'"):
        load_config(bad)
    bad.write_text("with_method:\n  remixmach:\n    optim:\n      lr: 0.1\n")
    with pytest.raises(ConfigError, match="no method is called 'remixmach'"):
        load_config(bad)


def test_remixmatch_refuses_what_its_step_cannot_do(tmp_path):
    base = ROOT / "yaml" / "cifar10_250.yaml"
    with pytest.raises(ConfigError, match="train.mu=7: ReMixMatch mixes"):
        load_config(base, [f"data.root={tmp_path}", "method.name=remixmatch", "train.mu=7"])
    with pytest.raises(ConfigError, match="data.randaug_n=0"):
        load_config(base, [f"data.root={tmp_path}", "method.name=remixmatch", "data.randaug_n=2"])
    ok = load_config(base, [f"data.root={tmp_path}", "method.name=remixmatch", "data.randaug_n=2",
                            "method.remixmatch.ctaugment=false"])  # USB's reading: RandAugment views
    assert not ok.method.params.ctaugment
