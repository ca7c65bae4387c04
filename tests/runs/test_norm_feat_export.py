"""model.norm_feat (SimMatchV2's LayerNorm on the pooled feature) exports as torchvision's ResNet
with fc = Sequential(LayerNorm, Linear): loadable in two lines, the same logits."""
from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from conftest import ROOT


def test_norm_feat_network_exports_into_torchvision_with_layernorm_fc():
    from simmatch.config import load_config
    from simmatch.models import network_for
    from simmatch.weights.networks import split_backbone

    cfg = load_config(ROOT / "yaml" / "digits.yaml", ["model.norm_feat=true", "model.arch=resnet18"])
    net = network_for(cfg).eval()
    with torch.no_grad():  # not the LayerNorm's identity start
        net.norm.weight.uniform_(0.5, 1.5)
        net.norm.bias.uniform_(-0.5, 0.5)
    backbone, head = split_backbone(net.state_dict())
    assert set(head) and "fc.weight" not in backbone

    plain = torchvision.models.resnet18(num_classes=cfg.data.num_classes)  # what a user writes
    plain.conv1, plain.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()  # the small-input stem
    plain.fc = nn.Sequential(nn.LayerNorm(512), nn.Linear(512, cfg.data.num_classes))
    plain.load_state_dict(backbone, strict=True)
    x = torch.randn(3, 3, cfg.data.crop_size, cfg.data.crop_size)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), net(x)[0], rtol=0, atol=1e-5)
        plain.fc = plain.fc[1]  # without the LayerNorm the logits are others: it is really exported
        assert not torch.allclose(plain(x), net(x)[0], atol=1e-3)



def test_model_card_build_lines_rebuild_the_norm_feat_network():
    """The card's `build` (torch and torchvision only) for a torchvision arch with the small stem and
    the LayerNorm: its model takes the exported weights strictly and gives the training logits."""
    from simmatch.config import load_config
    from simmatch.models import network_for
    from simmatch.weights.export import build_lines
    from simmatch.weights.networks import split_backbone

    cfg = load_config(ROOT / "yaml" / "digits_v2.yaml", ["model.arch=resnet18"])
    net = network_for(cfg).eval()
    backbone, _ = split_backbone(net.state_dict())
    lines = build_lines(cfg)
    assert "torchvision.models.resnet18(num_classes=10)" in lines and "nn.LayerNorm" in lines
    built: dict = {}
    exec(lines, built)  # noqa: S102 - the card's lines, as a user would run them
    built["model"].load_state_dict(backbone, strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(built["model"].eval()(x), net(x)[0])
