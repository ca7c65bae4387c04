"""The networks a training checkpoint holds: its config, the student's or teacher's weights,
the training `Network` built from them, and the plain model they export into.

Shared by evaluation (engine/offline.py) and export (weights/export.py); the student and teacher
are `Network`s whose `backbone` is a torchvision ResNet or a Wide ResNet (models/wrn.py) with
`fc` as the classifier, so the exported weights are a prefix strip.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision

from simmatch.checkpoint.store import find_checkpoint
from simmatch.config import Config, from_dict
from simmatch.errors import CheckpointError, UserError
from simmatch.models import Network, network_for
from simmatch.models.network import resnet10, small_input_stem
from simmatch.models.wrn import ARCHS as WRN_ARCHS

PREFIXES = {"student": "student.", "teacher": "teacher.module."}


def load_run_checkpoint(path: str | Path, which_ckpt: str = "last") -> tuple[Path, dict, Config]:
    """A training checkpoint (a file, or a run directory's `last` or `best` one) and its config."""
    file, state = find_checkpoint(path, which_ckpt)  # `last` falls back past damaged checkpoints
    if "method" not in state or "config" not in state:
        raise CheckpointError(f"{file} is not a training checkpoint of this project")
    return file, state, from_dict(state["config"], f"config inside {file}")


def network_state(state: dict, which: str) -> dict[str, torch.Tensor]:
    """The Network (backbone + head) weights of the student or the teacher."""
    if which not in PREFIXES:
        raise UserError(f"--which must be student or teacher, not {which!r}")
    prefix = PREFIXES[which]
    out = {k[len(prefix):]: v for k, v in state["method"].items() if k.startswith(prefix)}
    if not out:
        raise CheckpointError(f"the checkpoint holds no {which} weights")
    return out


TRAINING_ONLY = ("predictor.", "rotation.")  # student modules outside the evaluated network


def split_backbone(net_state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """torchvision weights and the projection head. A network with the feature LayerNorm
    (model.norm_feat) exports it as the first layer of `fc`: fc = Sequential(LayerNorm, Linear)."""
    backbone = {k[len("backbone."):]: v for k, v in net_state.items() if k.startswith("backbone.")}
    head = {k[len("head."):]: v for k, v in net_state.items() if k.startswith("head.")}
    if "norm.weight" in net_state:
        for part in ("weight", "bias"):
            backbone[f"fc.0.{part}"] = net_state[f"norm.{part}"]
            backbone[f"fc.1.{part}"] = backbone.pop(f"fc.{part}")
    return backbone, head


def torchvision_model(cfg: Config) -> torch.nn.Module:
    """The plain model the export loads into: a torchvision ResNet (stem changed for small inputs),
    or a Wide ResNet, whose plain-torch source the model card carries (models/wrn.py)."""
    if cfg.model.arch in WRN_ARCHS:
        net = WRN_ARCHS[cfg.model.arch](cfg.data.num_classes)
    elif cfg.model.arch == "resnet10":
        net = resnet10(cfg.data.num_classes)
    else:
        net = getattr(torchvision.models, cfg.model.arch)(weights=None, num_classes=cfg.data.num_classes)
    if cfg.model.small_input and cfg.model.arch not in WRN_ARCHS:  # training refuses it for a WRN
        small_input_stem(net)
    if cfg.model.norm_feat:  # loads as: model.fc = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, classes))
        net.fc = torch.nn.Sequential(torch.nn.LayerNorm(net.fc.in_features), net.fc)
    return net


def training_network(cfg: Config, net_state: dict) -> Network:
    """Trunk, classifier and projection head; what only training uses (ISD's predictor, ReMixMatch's
    rotation classifier) is not needed to evaluate."""
    net_state = {k: v for k, v in net_state.items() if not k.startswith(TRAINING_ONLY)}
    has_head = any(k.startswith("head.") for k in net_state)
    net = network_for(cfg, head=has_head)
    net.load_state_dict(net_state, strict=True)
    return net
