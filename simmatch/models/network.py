"""Student/teacher network: a torchvision ResNet or a Wide ResNet (models/wrn.py), its `fc` the
classifier, plus a projection head.

Keeping the backbone module whole means the trained weights export as its plain state_dict
(`backbone.` prefix stripped) that loads with strict=True.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from simmatch.errors import ConfigError
from simmatch.models.wrn import ARCHS as WRN_ARCHS


def small_input_stem(net: torchvision.models.ResNet) -> None:
    """3x3 stride-1 first conv and no max-pool: keeps spatial size for 32-px (or smaller) images."""
    width = net.conv1.out_channels
    net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()


def resnet10(num_classes: int = 1000) -> torchvision.models.ResNet:
    """One BasicBlock per stage: the smallest ResNet with torchvision's layer names (CPU demos, tests)."""
    return torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=num_classes)


def build_backbone(arch: str, num_classes: int, small_input: bool = False) -> nn.Module:
    """A torchvision ResNet by name (`resnet10`, `resnet18` ... `wide_resnet50_2`) or a Wide ResNet
    (`wrn_28_2`, `wrn_28_8`, `wrn_37_2`), randomly initialised. A Wide ResNet is a small-input
    network already (3x3 stride-1 stem, no max-pool): `small_input`, which swaps a ResNet's stem,
    is refused for it rather than silently meaning nothing."""
    if arch in WRN_ARCHS:
        if small_input:
            raise ConfigError(f"model.small_input=true swaps a torchvision ResNet's stem; {arch} already has "
                              f"a 3x3 stride-1 stem: set model.small_input=false")
        return WRN_ARCHS[arch](num_classes)
    if arch == "resnet10":
        net = resnet10(num_classes)
    elif arch.startswith(("resnet", "wide_resnet", "resnext")) and hasattr(torchvision.models, arch):
        net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    else:
        raise ConfigError(f"model.arch={arch!r} is not a torchvision ResNet, resnet10 or one of "
                          f"{', '.join(WRN_ARCHS)}")
    if small_input:
        small_input_stem(net)
    return net


def mlp(dim: int, hidden: int, out_dim: int, bn: bool) -> list[nn.Module]:
    """Linear -> [BatchNorm1d] -> ReLU -> Linear."""
    return [nn.Linear(dim, hidden), *([nn.BatchNorm1d(hidden)] if bn else []), nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim)]


class ProjectionHead(nn.Sequential):
    """dim -> hidden -> out, ReLU (and optionally BN) between; L2-normalised by the caller.
    SimMatch: 2048 -> 2048 -> 128 without BN; ISD: 2048 -> 4096 (BN) -> 512."""

    def __init__(self, dim: int, out_dim: int, hidden: int = 0, bn: bool = False):
        super().__init__(*mlp(dim, hidden or dim, out_dim, bn))


class Predictor(nn.Sequential):
    """The student-only MLP on top of the projection (ISD, BYOL): dim -> hidden (BN) -> dim."""

    def __init__(self, dim: int, hidden: int, bn: bool = True):
        super().__init__(*mlp(dim, hidden, dim, bn))


class Network(nn.Module):
    """ResNet or Wide ResNet trunk -> (class logits from `backbone.fc`, L2-normalised embedding from `head`).

    With a `predictor` (ISD), `forward(x)` embeds through it and `forward(x, predict=False)`
    skips it, which is what the teacher does. Keeping the predictor inside this module keeps
    it inside DDP, so its gradients are averaged like the rest.
    """

    def __init__(self, backbone: nn.Module, proj_dim: int = 128, predictor_hidden: int = 0,
                 proj_hidden: int = 0, proj_bn: bool = False, predictor_bn: bool = True, norm_feat: bool = False):
        super().__init__()
        self.backbone = backbone
        self.feat_dim = backbone.fc.in_features
        # SimMatchV2's --norm_feat: the pooled feature layer-normalised before classifier and head
        self.norm = nn.LayerNorm(self.feat_dim) if norm_feat else None
        self.head = ProjectionHead(self.feat_dim, proj_dim, proj_hidden, proj_bn) if proj_dim > 0 else None
        self.predictor = (Predictor(proj_dim, predictor_hidden, predictor_bn)
                          if predictor_hidden > 0 and proj_dim > 0 else None)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature `fc` classifies: a backbone's own `forward_features` (Wide ResNet),
        else a torchvision ResNet's layers up to the average pool."""
        b = self.backbone
        if hasattr(b, "forward_features"):
            return b.forward_features(x)
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        x = b.layer4(b.layer3(b.layer2(b.layer1(x))))
        return torch.flatten(b.avgpool(x), 1)

    def forward(self, x: torch.Tensor, predict: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        feat = self.features(x)
        if self.norm is not None:
            feat = self.norm(feat)
        logits = self.backbone.fc(feat)
        if self.head is None:
            return logits, None
        z = self.head(feat)
        if predict and self.predictor is not None:
            z = self.predictor(z)
        return logits, F.normalize(z.float(), dim=1)


def build_network(arch: str, num_classes: int, small_input: bool = False, proj_dim: int = 128,
                  predictor_hidden: int = 0, proj_hidden: int = 0, proj_bn: bool = False,
                  predictor_bn: bool = True, norm_feat: bool = False) -> Network:
    return Network(build_backbone(arch, num_classes, small_input), proj_dim, predictor_hidden,
                   proj_hidden, proj_bn, predictor_bn, norm_feat)


def network_for(cfg, head: bool = True, predictor: tuple[int, bool] | None = None) -> Network:
    """The network `cfg.model` describes (a `simmatch.config.Config`), with or without the
    projection head, and with a predictor of (hidden width, BN) when a method asks for one."""
    m = cfg.model
    hidden, bn = predictor if predictor is not None else (0, True)
    return build_network(m.arch, cfg.data.num_classes, m.small_input, m.proj_dim if head else 0,
                         hidden, m.proj_hidden, m.proj_bn, bn, m.norm_feat)
