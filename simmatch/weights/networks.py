"""The networks a training checkpoint holds: its config, the student's or teacher's weights,
the training `Network` built from them, and the plain model they export into. The SimMatch and
SimMatchV2 authors' released checkpoints are read too (`weights/authors.py`); they hold no config,
so `--cfg` names one.

Shared by evaluation (engine/offline.py) and export (weights/export.py); the student and teacher
are `Network`s whose `backbone` is a torchvision ResNet or a Wide ResNet (models/wrn.py) with
`fc` as the classifier, so the exported weights are a prefix strip.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision

from simmatch.checkpoint.store import find_checkpoint
from simmatch.config import Config, apply_overrides, from_dict, load_config
from simmatch.errors import CheckpointError, UserError
from simmatch.models import Network, network_for
from simmatch.models.network import resnet10, small_input_stem
from simmatch.models.wrn import ARCHS as WRN_ARCHS
from simmatch.weights.authors import authors_network, few, read_authors

PREFIXES = {"student": "student.", "teacher": "teacher.module."}


def load_run_checkpoint(path: str | Path, which_ckpt: str = "last", cfg_path: str | Path | None = None,
                        overrides: list[str] | tuple[str, ...] = ()) -> tuple[Path, dict, Config]:
    """A training checkpoint (a file, or a run directory's `last` or `best` one) and its config with
    `overrides` applied. One of the SimMatch / SimMatchV2 authors' files holds no config: `cfg_path`
    (--cfg) gives it, and its state is `{"authors": AuthorsFile, "iteration": None, "epoch": ...}`."""
    file, state = find_checkpoint(path, which_ckpt)  # `last` falls back past damaged checkpoints
    if "method" in state and "config" in state:
        if cfg_path is not None:
            raise UserError(f"--cfg is for the authors' checkpoints, which hold no config; {file} carries its "
                            f"own (change its data with key=value overrides)")
        return file, state, apply_overrides(from_dict(state["config"], f"config inside {file}"), list(overrides))
    authors = read_authors(state, file)  # any other layout is refused here, naming its keys
    if cfg_path is None:
        example = "yaml/in1k_1pct_v2.yaml" if authors.layout == "SimMatchV2" else "yaml/in1k_1pct.yaml"
        raise UserError(f"{file} is {authors.describe()}, which holds no config: name one with --cfg "
                        f"(e.g. --cfg {example} data.root=DIR)")
    cfg = load_config(cfg_path, list(overrides))
    return file, {"authors": authors, "iteration": None, "epoch": authors.epoch}, cfg


def describe(state: dict) -> str:
    """Where the weights come from, for the tools' lines: `iteration N` or the authors' file."""
    return state["authors"].describe() if "authors" in state else f"iteration {int(state['iteration'])}"


def held_networks(state: dict) -> tuple[str, ...]:
    """The networks a checkpoint holds (an authors' file may hold only one)."""
    return tuple(state["authors"].networks) if "authors" in state else tuple(PREFIXES)


def network_state(state: dict, which: str, file: str | Path = "the checkpoint") -> dict[str, torch.Tensor]:
    """The Network (backbone + head) weights of the student or the teacher."""
    if which not in PREFIXES:
        raise UserError(f"--which must be student or teacher, not {which!r}")
    if "authors" in state:
        return authors_network(state["authors"], which, file)
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
    check_fits(cfg, net.state_dict(), net_state)
    net.load_state_dict(net_state, strict=True)
    return net


def check_fits(cfg: Config, target: dict[str, torch.Tensor], net_state: dict[str, torch.Tensor]) -> None:
    """One line when the weights are not of the configured network (an authors' file read with
    another --cfg's arch, classes, projection width or model.norm_feat)."""
    missing = [k for k in target if k not in net_state]
    unexpected = [k for k in net_state if k not in target]
    shapes = [f"{k} {tuple(net_state[k].shape)} (configured {tuple(target[k].shape)})"
              for k in target if k in net_state and net_state[k].shape != target[k].shape]
    if not (missing or unexpected or shapes):
        return
    m = cfg.model
    hint = ("; the weights hold the feature LayerNorm `norm`: set model.norm_feat=true"
            if "norm.weight" in net_state and not m.norm_feat else
            "; the weights hold no feature LayerNorm `norm`: set model.norm_feat=false"
            if "norm.weight" in target and "norm.weight" not in net_state else "")
    parts = [f"{what} {few(names, 3)}" for what, names in
             (("missing", missing), ("unexpected", unexpected), ("shape of", shapes)) if names]
    raise CheckpointError(f"the weights do not fit the configured network (model.arch={m.arch}, "
                          f"model.small_input={str(m.small_input).lower()}, model.proj_dim={m.proj_dim}, "
                          f"data.num_classes={cfg.data.num_classes}, model.norm_feat={str(m.norm_feat).lower()}): "
                          f"{'; '.join(parts)}{hint}")
