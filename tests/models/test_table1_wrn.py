"""The Wide ResNets of the CIFAR / SVHN / STL-10 recipes (WRN-28-2, WRN-28-8, WRN-37-2): their
parameter counts against the published figures and a count over layer shapes written here, a
forward written here in torch.nn.functional, the BN / leaky ReLU settings and initialisation, the
training `Network` on top, and the export: the model card's `build` (torch only) takes the
exported weights strictly and gives the training logits."""
from __future__ import annotations

import builtins
import math
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import ROOT
from simmatch.errors import ConfigError
from simmatch.models import build_network
from simmatch.models.network import build_backbone
from simmatch.models.wrn import ARCHS

# (widen, groups, first stride) of each arch; depth 28 = 4 blocks per group throughout
LAYOUT = {"wrn_28_2": (2, 3, 1), "wrn_28_8": (8, 3, 1), "wrn_37_2": (2, 4, 2)}
BLOCKS = 4


def reference_shapes(arch: str, classes: int) -> list[tuple[int, ...]]:
    """Every parameter's shape, from the architecture as the papers describe it: a bias-free 3x3 stem
    of 16 channels; per block BN(in), 3x3 conv in->out, BN(out), 3x3 conv out->out, a bias-free 1x1
    shortcut where the width changes; the final BN and the Linear classifier."""
    widen, groups, _ = LAYOUT[arch]
    shapes: list[tuple[int, ...]] = [(16, 3, 3, 3)]
    c_in = 16
    for g in range(groups):
        c_out = 16 * widen * 2**g
        for i in range(BLOCKS):
            cin = c_in if i == 0 else c_out
            shapes += [(cin,), (cin,), (c_out, cin, 3, 3), (c_out,), (c_out,), (c_out, c_out, 3, 3)]
            if cin != c_out:
                shapes.append((c_out, cin, 1, 1))
        c_in = c_out
    return shapes + [(c_in,), (c_in,), (classes, c_in), (classes,)]


@pytest.mark.parametrize("arch, classes, known", [
    ("wrn_28_2", 10, 1_467_610),   # CIFAR-10 / SVHN: the figure FixMatch and USB quote (1.47M)
    ("wrn_28_8", 100, 23_401_012),  # CIFAR-100 (23.4M)
    ("wrn_37_2", 10, 5_929_434),   # STL-10: USB's wrn_var_37_2 layout without conv biases (theirs: 5,933,770)
])
def test_table1_parameter_counts(arch, classes, known):
    model = ARCHS[arch](classes)
    reference = reference_shapes(arch, classes)
    assert sum(math.prod(s) for s in reference) == known
    assert sum(p.numel() for p in model.parameters()) == known
    assert Counter(tuple(p.shape) for p in model.parameters()) == Counter(reference)
    assert model.fc.in_features == 16 * LAYOUT[arch][0] * 2 ** (LAYOUT[arch][1] - 1)


def randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Running statistics and affine parameters away from their start, so that eval mode is no identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def reference_forward(sd: dict[str, torch.Tensor], arch: str, x: torch.Tensor,
                      shortcut_reads_activation_everywhere: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode logits and pooled feature in torch.nn.functional from the weights by name: each block
    is BN, leaky ReLU(0.1), conv (stride on the first block), BN, leaky ReLU, conv, plus a shortcut
    that reads the activated input in the first group (activate_before_residual) and the raw input
    elsewhere (FixMatch's block). The flag gives USB's variant (activated input everywhere)."""
    _, groups, first_stride = LAYOUT[arch]

    def act(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.leaky_relu(F.batch_norm(t, sd[f"{name}.running_mean"], sd[f"{name}.running_var"],
                                         sd[f"{name}.weight"], sd[f"{name}.bias"], False, 0.0, 1e-5), 0.1)

    y = F.conv2d(x, sd["conv1.weight"], padding=1)
    for g in range(1, groups + 1):
        for i in range(BLOCKS):
            p = f"block{g}.{i}"
            stride = (first_stride if g == 1 else 2) if i == 0 else 1
            a = act(y, f"{p}.bn1")
            h = F.conv2d(a, sd[f"{p}.conv1.weight"], stride=stride, padding=1)
            h = F.conv2d(act(h, f"{p}.bn2"), sd[f"{p}.conv2.weight"], padding=1)
            if f"{p}.shortcut.weight" in sd:
                source = a if g == 1 or shortcut_reads_activation_everywhere else y
                y = F.conv2d(source, sd[f"{p}.shortcut.weight"], stride=stride) + h
            else:
                y = y + h
    feat = act(y, "bn").mean(dim=(2, 3))
    return F.linear(feat, sd["fc.weight"], sd["fc.bias"]), feat


@pytest.mark.parametrize("arch", ["wrn_28_2", "wrn_37_2"])
def test_table1_forward_matches_a_functional_reference(arch):
    torch.manual_seed(0)
    model = ARCHS[arch](10)
    randomise_bn(model)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feat = model.forward_features(x)
        logits = model(x)
        want_logits, want_feat = reference_forward(model.state_dict(), arch, x)
        usb_logits, _ = reference_forward(model.state_dict(), arch, x, shortcut_reads_activation_everywhere=True)
    assert feat.shape == (2, model.fc.in_features) and logits.shape == (2, 10)
    torch.testing.assert_close(feat, want_feat, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-5)
    # control: the shortcut's input matters, and the tolerance tells the two blocks apart
    assert not torch.allclose(logits, usb_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch, size, pooled", [("wrn_28_2", 32, 8), ("wrn_28_8", 32, 8), ("wrn_37_2", 96, 6)])
def test_table1_output_shapes_at_the_recipe_sizes(arch, size, pooled):
    """32 px -> 8 x 8 before pooling (group strides 1, 2, 2); STL-10's 96 px -> 6 x 6 (2, 2, 2, 2).
    Batch 1 in eval mode: WRN-28-8 is slow on a CPU."""
    classes = 100 if arch == "wrn_28_8" else 10
    model = ARCHS[arch](classes).eval()
    seen = []
    model.bn.register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape[1:])))
    with torch.no_grad():
        logits = model(torch.randn(1, 3, size, size))
    assert logits.shape == (1, classes) and seen == [(model.fc.in_features, pooled, pooled)]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_table1_bn_momentum_leaky_slope_no_dropout_no_conv_bias(arch):
    model = ARCHS[arch](10 if arch != "wrn_28_8" else 100)
    kinds = Counter(type(m) for m in model.modules())
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    relus = [m for m in model.modules() if isinstance(m, nn.LeakyReLU)]
    assert bns and all(m.momentum == 0.001 and m.eps == 1e-5 and m.affine for m in bns)
    assert len(relus) == len(bns) and all(m.negative_slope == 0.1 for m in relus)  # one activation per BN
    assert kinds[nn.ReLU] == 0 and kinds[nn.Dropout] == 0 and kinds[nn.MaxPool2d] == 0
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert isinstance(model.fc, nn.Linear) and kinds[nn.Linear] == 1


def test_table1_initialisation_statistics():
    """Convs kaiming-normal with fan_out and the leaky_relu gain (sqrt 2: kaiming's default slope 0),
    BN 1 / 0, fc xavier-normal with zero bias."""
    torch.manual_seed(0)
    model = ARCHS["wrn_28_2"](10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    parts, changing = [], 0
    with torch.no_grad():
        for m in convs:
            out_c, in_c, kh, kw = m.weight.shape
            want = math.sqrt(2.0 / (out_c * kh * kw))
            parts.append(m.weight.flatten() / want)
            if m.weight.numel() >= 9000:  # each large layer alone, within its sampling error
                assert abs(float(m.weight.std()) / want - 1) < 0.05
                assert abs(float(m.weight.mean())) < 0.05 * want
                if in_c != out_c:  # control: fan_in would give these layers another std
                    changing += 1
                    assert abs(float(m.weight.std()) / math.sqrt(2.0 / (in_c * kh * kw)) - 1) > 0.25
        assert changing >= 2 and abs(float(torch.cat(parts).std()) - 1) < 0.02
    fc = model.fc.requires_grad_(False)
    xavier = math.sqrt(2.0 / (fc.in_features + fc.out_features))
    assert abs(float(fc.weight.std()) / xavier - 1) < 0.1
    assert abs(float(fc.weight.std()) / (1 / math.sqrt(3 * fc.in_features)) - 1) > 0.3  # not torch's default
    assert torch.equal(fc.bias, torch.zeros(10))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))


def test_table1_network_gives_logits_and_a_normalised_embedding():
    torch.manual_seed(0)
    net = build_network("wrn_28_2", 10, proj_dim=16)
    randomise_bn(net)
    net.eval()
    assert net.feat_dim == 128
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, z = net(x)
        assert torch.equal(net.features(x), net.backbone.forward_features(x))
        assert torch.equal(logits, net.backbone(x))  # the classifier path is the backbone's own
    assert logits.shape == (3, 10) and z.shape == (3, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    # a torchvision ResNet keeps its own path (it has no forward_features)
    resnet = build_network("resnet10", 10, small_input=True, proj_dim=0).eval()
    assert not hasattr(resnet.backbone, "forward_features")
    with torch.no_grad():
        y = torch.randn(2, 3, 16, 16)
        assert torch.equal(resnet(y)[0], resnet.backbone(y))


def test_table1_small_input_is_refused_for_a_wrn():
    with pytest.raises(ConfigError) as err:
        build_backbone("wrn_28_2", 10, small_input=True)
    assert len(str(err.value).splitlines()) == 1 and "model.small_input=false" in str(err.value)
    with pytest.raises(ConfigError, match="wrn_28_2, wrn_28_8, wrn_37_2"):
        build_backbone("wrn_28_4", 10)


def only_torch_namespace() -> dict:
    """Globals for exec'ing the card's `build` as a stranger would: any import but torch's fails."""
    real = builtins.__import__

    def torch_only(name, *args, **kwargs):
        if name.split(".")[0] != "torch":
            raise ImportError(f"the card's build imports {name}")
        return real(name, *args, **kwargs)

    return {"__name__": "card_build", "__builtins__": {**vars(builtins), "__import__": torch_only}}


@pytest.mark.parametrize("recipe, arch", [("digits.yaml", "wrn_28_2"), ("digits_v2.yaml", "wrn_37_2")])
def test_table1_card_build_rebuilds_the_exported_wrn(recipe, arch):
    """split_backbone on the training Network's state (what export writes), the card's `build`
    exec'd with torch only, strict load, the same logits as the training network's classifier path;
    digits_v2 adds the feature LayerNorm (fc = Sequential(LayerNorm, Linear))."""
    from simmatch.config import load_config
    from simmatch.models import network_for
    from simmatch.weights.export import build_lines, model_card, verify
    from simmatch.weights.networks import split_backbone

    cfg = load_config(ROOT / "yaml" / recipe, [f"model.arch={arch}", "model.small_input=false"])
    torch.manual_seed(0)
    net = network_for(cfg)
    randomise_bn(net)
    net.eval()
    net_state = net.state_dict()
    backbone, head = split_backbone(net_state)
    assert head and not any(k.startswith("head.") for k in backbone)

    card = model_card(cfg, {"iteration": 7, "classes": [str(i) for i in range(10)]}, "teacher")
    assert card["build"] == build_lines(cfg) and card["arch"] == arch
    assert "torchvision" not in card["format"] + card["build"] and "constructor" not in card
    assert "simmatch" not in card["build"]
    built = only_torch_namespace()
    exec(card["build"], built)  # noqa: S102 - the card's own lines, as a stranger would run them
    model = built["model"]
    assert type(model).__module__ == "card_build"  # defined by the card, not imported from the project
    model.load_state_dict(backbone, strict=True)
    model.eval()
    x = torch.randn(3, 3, cfg.data.crop_size, cfg.data.crop_size)
    with torch.no_grad():
        assert torch.equal(model(x), net(x)[0])
    assert verify(cfg, net_state, backbone) == 0.0  # the export's own check, on the plain model it builds
    if cfg.model.norm_feat:
        assert isinstance(model.fc, nn.Sequential) and isinstance(model.fc[0], nn.LayerNorm)


def test_table1_card_build_needs_torchvision_for_a_resnet():
    """The guard of the test above really fires: a ResNet's card imports torchvision."""
    from simmatch.config import load_config
    from simmatch.weights.export import build_lines

    lines = build_lines(load_config(ROOT / "yaml" / "digits.yaml", []))
    with pytest.raises(ImportError, match="torchvision"):
        exec(lines, only_torch_namespace())  # noqa: S102
