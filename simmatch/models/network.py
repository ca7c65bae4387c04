"""Student/teacher network: a torchvision ResNet (its `fc` is the classifier) plus a projection head.

Keeping the torchvision module whole means the trained weights export as a plain
torchvision state_dict (`backbone.` prefix stripped) that loads with strict=True.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from simmatch.errors import ConfigError


def _small_input_stem(net: torchvision.models.ResNet) -> None:
    """3x3 stride-1 first conv and no max-pool: keeps spatial size for 32-px (or smaller) images."""
    width = net.conv1.out_channels
    net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()


def resnet10(num_classes: int = 1000) -> torchvision.models.ResNet:
    """One BasicBlock per stage: the smallest ResNet with torchvision's layer names (CPU demos, tests)."""
    return torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=num_classes)


def build_backbone(arch: str, num_classes: int, small_input: bool = False) -> torchvision.models.ResNet:
    """A torchvision ResNet by name (`resnet10`, `resnet18` ... `wide_resnet50_2`), randomly initialised."""
    if arch == "resnet10":
        net = resnet10(num_classes)
    elif arch.startswith(("resnet", "wide_resnet", "resnext")) and hasattr(torchvision.models, arch):
        net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    else:
        raise ConfigError(f"model.arch={arch!r} is not a torchvision ResNet (or resnet10)")
    if small_input:
        _small_input_stem(net)
    return net


class ProjectionHead(nn.Sequential):
    """dim -> dim -> out, ReLU between; the output is L2-normalised by the caller."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, out_dim))


class Predictor(nn.Sequential):
    """The student-only MLP on top of the projection (ISD, BYOL): dim -> hidden -> dim."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim))


class Network(nn.Module):
    """ResNet trunk -> (class logits from `backbone.fc`, L2-normalised embedding from `head`).

    With a `predictor` (ISD), `forward(x)` embeds through it and `forward(x, predict=False)`
    skips it, which is what the teacher does. Keeping the predictor inside this module keeps
    it inside DDP, so its gradients are averaged like the rest.
    """

    def __init__(self, backbone: torchvision.models.ResNet, proj_dim: int = 128, predictor_hidden: int = 0):
        super().__init__()
        self.backbone = backbone
        self.feat_dim = backbone.fc.in_features
        self.head = ProjectionHead(self.feat_dim, proj_dim) if proj_dim > 0 else None
        self.predictor = Predictor(proj_dim, predictor_hidden) if predictor_hidden > 0 and proj_dim > 0 else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        x = b.layer4(b.layer3(b.layer2(b.layer1(x))))
        return torch.flatten(b.avgpool(x), 1)

    def forward(self, x: torch.Tensor, predict: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        feat = self.features(x)
        logits = self.backbone.fc(feat)
        if self.head is None:
            return logits, None
        z = self.head(feat)
        if predict and self.predictor is not None:
            z = self.predictor(z)
        return logits, F.normalize(z.float(), dim=1)


def build_network(arch: str, num_classes: int, small_input: bool = False, proj_dim: int = 128,
                  predictor_hidden: int = 0) -> Network:
    return Network(build_backbone(arch, num_classes, small_input), proj_dim, predictor_hidden)
