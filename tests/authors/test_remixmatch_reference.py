"""The set-up of the ReMixMatch transcription test (tests/authors/test_remixmatch_transcription.py)
around its reference, tests/authors/official_remixmatch.py, and the reference's own tests.

The set-up: the tiny run's sizes and config (yaml/cifar10_40.yaml with method.name=remixmatch made
tiny), its fixed batches, the MixUp draws from the project's keyed generator, the name map from the
project's student to the reference's network, the project's policies decoded into official ones,
the reference's CTAugment rates in OPS order, the reference built from the project's initial student
(with one control's change), and the checks that the run's recipe is the official flags and that
the parameters the project decays are the official 'kernel' variables.

The reference's own tests: its interleave on a hand example, and its random_rotate against
TensorFlow's NHWC slicing run literally in NumPy and against the rotations its labels name: parts of
the transcription checked on their own, without the project.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from official_remixmatch import (
    FLAGS,
    Classifier,
    OfficialReMixMatch,
    interleave,
    interleave_offsets,
    random_rotate,
)
from official_remixmatch_training import OPS

from conftest import ROOT

pytestmark = pytest.mark.timeout(300)

# per-rank batch B (a multiple of 4: the rotation's quarters); SIZE 16 px: at 8 px layer4's BN batch
# is 4 values a channel, so ill-conditioned that one ulp of a layer1 weight moves the gradients by 1e-5
CLASSES, B, K, SIZE = 10, 4, 2, 16
STEPS, RAMP, ITERS = 5, 2, 8  # steps run; the ramp-up (0, 0.5, then 1 from step RAMP on); the schedule's K
SEED, EMA = 7, 0.5  # train.seed (the keyed draws); model.ema_momentum
W_ROT = 0.5  # the flag's default, which yaml/cifar10_40.yaml keeps (its code's 40-label script: 2)


def tiny_config(world: int):
    from simmatch.config import load_config

    return load_config(ROOT / "yaml" / "cifar10_40.yaml", [
        "method.name=remixmatch", "model.arch=resnet10", "model.small_input=true", "data.backend=synthetic",
        "data.root=/nonexistent", "data.format=folder", f"data.num_classes={CLASSES}",
        f"data.synthetic_size={STEPS * world * B}", f"data.crop_size={SIZE}", f"data.val_resize={SIZE}",
        f"data.num_strong={K}", f"train.batch_size={world * B}", f"optim.base_batch={world * B}",
        f"optim.iters={ITERS}", "train.channels_last=false", "train.bn_group_ranks=1", f"train.seed={SEED}",
        f"model.ema_momentum={EMA}", f"method.remixmatch.rampup_iters={RAMP}"])


def draws(rank: int, iteration: int, purpose: int) -> np.random.Generator:
    """The spec's generator of one rank's draws of one kind at one step (purpose 3: MixUp)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([SEED, rank, iteration, purpose])))


def mixup_draws(rank: int, iteration: int, alpha: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """np_beta's draws (float32) and the shuffle, from the keyed generator, in that order."""
    gen = draws(rank, iteration, 3)
    mix = gen.beta(alpha, alpha, n).astype("f")
    return torch.from_numpy(mix), torch.from_numpy(gen.permutation(n))


def make_batches(rank: int, world: int, mean: list[float], std: list[float]) -> tuple[list, list]:
    """STEPS fixed batches of this rank (the layout of simmatch/data/base.py `pack_batch`): images
    normalised from uint8 (what CTAugment takes back to uint8 exactly), a weak view and K strong ones."""
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def images(g):
        return (torch.randint(0, 256, (B, 3, SIZE, SIZE), generator=g).float() / 255 - m) / s

    labeled, unlabeled = [], []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(1000 * step + rank)
        index = torch.arange(B) + (step * world + rank) * B
        labeled.append({"x": images(g), "y": torch.randint(0, CLASSES, (B,), generator=g), "index": index})
        unlabeled.append({"weak": images(g), "strong": [images(g) for _ in range(K)],
                          "y": torch.randint(0, CLASSES, (B,), generator=g), "index": index})
    return labeled, unlabeled


def to_reference(name: str) -> str:
    """The project's student names -> the reference's Classifier."""
    if name.startswith("rotation."):
        return "classify_rot." + name[len("rotation."):]
    assert name.startswith("backbone."), name
    return name[len("backbone."):]


def decode_policies(policy: torch.Tensor) -> list:
    """The project's [b, depth, 1 + values] policy rows as official policies: (op name, values)."""
    names = list(OPS)
    out = []
    for row in policy.double().tolist():
        ops = []
        for entry in row:
            name = names[int(entry[0])]
            values = entry[1:1 + len(OPS[name])]
            assert not any(math.isnan(v) for v in values) and all(math.isnan(v) for v in entry[1 + len(OPS[name]):])
            ops.append((name, values))
        out.append(ops)
    return out


def official_rates(ref: OfficialReMixMatch) -> torch.Tensor:
    """The reference's rate arrays, op after op in OPS order, array after array."""
    return torch.from_numpy(np.concatenate([r for k in OPS for r in ref.augmenter.rates[k]]))


def reference(initial: dict, control: str = "") -> OfficialReMixMatch:
    """The official step from the project's initial student (`initial`: its state dict), with one
    control's change."""
    torch.manual_seed(1234)  # its own initialisation first, then the project's weights
    net = Classifier([1, 1, 1, 1], CLASSES)
    net.load_state_dict({to_reference(k): v.clone() for k, v in initial.items()})
    kwargs = {}
    if control == "temperature":
        kwargs["T"] = FLAGS["T"] * (1 + 1e-4)
    if control == "lambda_u":
        kwargs["w_match"] = FLAGS["w_match"] * (1 + 1e-4)
    return OfficialReMixMatch(net, CLASSES, B, K, w_rot=W_ROT, warmup_steps=RAMP, ema_decay=EMA,
                              ramp_ahead=int(control == "ramp_early"), decay_all=control == "decay_bn",
                              bn_every_forward=control == "bn_every", **kwargs)


def check_recipe(cfg, d, method, opt) -> None:
    """The project's values of the tiny run are the official flags (but for the sizes, the ramp-up
    and the EMA momentum, which the reference is given as the test sets them)."""
    from simmatch.methods.remixmatch import ctaugment

    m = cfg.method.params
    assert (m.mixup_alpha, m.temperature, m.lambda_u, m.lambda_u1, m.lambda_rot) == \
        (FLAGS["beta"], FLAGS["T"], FLAGS["w_match"], FLAGS["w_kl"], W_ROT)
    assert m.dist_align == FLAGS["use_dm"] and d.method_values == {"rampup_iters": RAMP, "da_len": FLAGS["dbuf"]}
    assert (m.ctaugment, m.cta_depth, m.cta_threshold, m.cta_decay) == \
        (True, FLAGS["adepth"], FLAGS["ath"], FLAGS["adecay"])
    assert (cfg.optim.name, cfg.optim.schedule, cfg.optim.weight_decay) == ("adam", "constant", FLAGS["wd"])
    assert d.lr == FLAGS["lr"] and d.ema_momentum == EMA and cfg.train.mu == 1 and cfg.data.num_strong == K
    assert cfg.model.teacher == "eman" and method.teacher.mode == "eman"
    a = FLAGS["adam"]
    assert all((g["betas"], g["eps"]) == ((a["beta1"], a["beta2"]), a["epsilon"]) for g in opt.param_groups)
    assert (method.alpha, method.temperature, method.lambda_u, method.lambda_u1, method.lambda_rot,
            method.rampup_iters) == (FLAGS["beta"], FLAGS["T"], FLAGS["w_match"], FLAGS["w_kl"], W_ROT, RAMP)
    # the project's ops are the official registrations, in their order (the policies' op indices)
    assert [(op.name, op.bins) for op in ctaugment.OPS] == list(OPS.items())
    assert (method.cta.depth, method.cta.threshold, method.cta.decay) == \
        (FLAGS["adepth"], FLAGS["ath"], FLAGS["adecay"])


def check_decay(method, opt, ref: OfficialReMixMatch) -> None:
    """The parameters the project decays (and at what rate) are the official 'kernel' variables."""
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] for p in g["params"]}
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, FLAGS["wd"]}
    assert all(g["lr"] == FLAGS["lr"] for g in opt.param_groups)
    theirs = dict(ref.net.named_parameters())
    kernels = {id(p) for p in ref.net.kernels()}
    names = {to_reference(n) for n, p in method.student.named_parameters() if id(p) in decayed}
    assert names == {n for n, p in theirs.items() if id(p) in kernels}, names
    assert "classify_rot.weight" in names  # the rotation head's kernel is in the 'classify' scopes


def test_remixmatch_reference_interleave():
    """The transcription's interleave on a hand example: 5 rows, 3 batches -> groups of 1, 2, 2 rows;
    batch i swaps its group i with batch 0's; applied twice, the identity."""
    a, b, c = (torch.arange(5) + 10 * k for k in range(3))
    assert interleave_offsets(5, 2) == [0, 1, 3, 5]
    out = interleave([a, b, c], 5)
    assert [o.tolist() for o in out] == [[0, 11, 12, 23, 24], [10, 1, 2, 13, 14], [20, 21, 22, 3, 4]]
    assert all(torch.equal(x, y) for x, y in zip(interleave(out, 5), [a, b, c]))
    assert interleave_offsets(4, 3) == [0, 1, 2, 3, 4] and interleave_offsets(4, 4) == [0, 0, 1, 2, 3, 4]


def test_remixmatch_reference_rotation():
    """The transcription's random_rotate (NCHW) against TensorFlow's NHWC slicing run literally in
    NumPy, and its labels against the rotations: 0 as it is, 1 by 180 degrees, 2 by 90 degrees
    counter-clockwise, 3 by 90 clockwise; on a 2 x 2 hand example too."""
    batch, b4 = 8, 2
    x = np.random.default_rng(0).random((batch, 5, 5, 3)).astype("f")  # NHWC
    xx, xt = x[:2 * b4], np.transpose(x[2 * b4:], [0, 2, 1, 3])
    tf_out = np.concatenate([xx[:b4], xx[b4:, ::-1, ::-1], xt[:b4, ::-1], xt[b4:, :, ::-1]], axis=0)
    mine, labels = random_rotate(torch.from_numpy(x).permute(0, 3, 1, 2), batch)
    assert np.array_equal(mine.permute(0, 2, 3, 1).numpy(), tf_out)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    turns = {0: 0, 1: 2, 2: 1, 3: -1}  # np.rot90's k: counter-clockwise quarter turns
    for i in range(batch):
        assert np.array_equal(tf_out[i], np.rot90(x[i], turns[int(labels[i])], axes=(0, 1)))
    hand = torch.tensor([[1, 2], [3, 4]]).view(1, 1, 2, 2).repeat(4, 1, 1, 1)
    rotated, labels = random_rotate(hand, 4)
    assert [r[0].tolist() for r in rotated] == [[[1, 2], [3, 4]], [[4, 3], [2, 1]], [[2, 4], [1, 3]], [[3, 1], [4, 2]]]
    assert labels.tolist() == [0, 1, 2, 3]
