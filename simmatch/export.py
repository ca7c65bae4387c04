"""Trained weights out of a run: a plain torchvision ResNet state_dict (.pth and .safetensors).

The student and teacher are `Network`s whose `backbone` is a torchvision ResNet with `fc`
as the classifier, so exporting is a prefix strip; the export is verified by comparing the
logits of a torchvision model loaded with strict=True against the training model's.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision

from simmatch import checkpoint as ckpt
from simmatch.config import Config, from_dict
from simmatch.errors import CheckpointError, UserError
from simmatch.models import Network, build_network
from simmatch.models.network import resnet10

PREFIXES = {"student": "student.", "teacher": "teacher.module."}


def load_run_checkpoint(path: str | Path) -> tuple[Path, dict, Config]:
    """A training checkpoint (file, or the newest in a run directory) and its config."""
    file = ckpt.resolve(path)
    state = ckpt.load(file)
    if "method" not in state or "config" not in state:
        raise CheckpointError(f"{file} is not a training checkpoint of this project")
    return file, state, from_dict(state["config"], f"config inside {file}")


def network_state(state: dict, which: str) -> dict[str, torch.Tensor]:
    """The Network (backbone + head) weights of the student or the teacher."""
    prefix = PREFIXES[which]
    out = {k[len(prefix):]: v for k, v in state["method"].items() if k.startswith(prefix)}
    if not out:
        raise CheckpointError(f"the checkpoint holds no {which} weights")
    return out


def split_backbone(net_state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    backbone = {k[len("backbone."):]: v for k, v in net_state.items() if k.startswith("backbone.")}
    head = {k[len("head."):]: v for k, v in net_state.items() if k.startswith("head.")}
    return backbone, head


def torchvision_model(cfg: Config) -> torchvision.models.ResNet:
    """The plain torchvision model the export loads into (stem changed for small inputs)."""
    if cfg.model.arch == "resnet10":
        net = resnet10(cfg.data.num_classes)
    else:
        net = getattr(torchvision.models, cfg.model.arch)(weights=None, num_classes=cfg.data.num_classes)
    if cfg.model.small_input:
        from simmatch.models.network import _small_input_stem

        _small_input_stem(net)
    return net


def training_network(cfg: Config, net_state: dict) -> Network:
    """Trunk, classifier and projection head; a student's predictor (ISD) is not needed to evaluate."""
    net_state = {k: v for k, v in net_state.items() if not k.startswith("predictor.")}
    has_head = any(k.startswith("head.") for k in net_state)
    net = build_network(cfg.model.arch, cfg.data.num_classes, cfg.model.small_input,
                        cfg.model.proj_dim if has_head else 0)
    net.load_state_dict(net_state, strict=True)
    return net


@torch.no_grad()
def verify(cfg: Config, net_state: dict, backbone: dict, size: int | None = None) -> float:
    """Max |logit difference| between the training model and the exported torchvision model."""
    size = size or cfg.data.crop_size
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    ours = training_network(cfg, net_state).eval()
    plain = torchvision_model(cfg)
    plain.load_state_dict(backbone, strict=True)
    plain.eval()
    return float((ours(x)[0] - plain(x)).abs().max())


def export(path: str | Path, which: str, out: str | Path, head_out: str | Path | None = None) -> dict:
    """Write `out` with .pth and .safetensors suffixes; returns what was written and the check."""
    from safetensors.torch import save_file

    if which not in PREFIXES:
        raise UserError(f"--which must be student or teacher, not {which!r}")
    file, state, cfg = load_run_checkpoint(path)
    net_state = network_state(state, which)
    backbone, head = split_backbone(net_state)
    diff = verify(cfg, net_state, backbone)
    out = Path(out)
    stem = out.with_suffix("") if out.suffix in (".pth", ".pt", ".safetensors") else out
    pth, st = stem.with_suffix(".pth"), stem.with_suffix(".safetensors")
    pth.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.contiguous() for k, v in backbone.items()}
    ckpt.atomic_torch_save(contiguous, pth)
    save_file(contiguous, str(st), metadata={"arch": cfg.model.arch, "which": which,
                                             "iteration": str(state["iteration"])})
    written = [pth, st]
    if head_out and head:
        ckpt.atomic_torch_save({k: v.contiguous() for k, v in head.items()}, Path(head_out))
        written.append(Path(head_out))
    return {"checkpoint": file, "iteration": int(state["iteration"]), "arch": cfg.model.arch,
            "small_input": cfg.model.small_input, "max_abs_diff": diff, "written": written}


def check_init_source(cfg: Config) -> None:
    """Fail before anything is written when model.init_from does not fit the configured model."""
    from simmatch.models.network import build_backbone
    from simmatch.weights import map_onto_trunk, read_weights

    target = build_backbone(cfg.model.arch, cfg.data.num_classes, cfg.model.small_input).state_dict()
    map_onto_trunk(read_weights(cfg.model.init_from), target, cfg.model.init_from, cfg.model.arch)


def init_student_from(method, path: str | Path, arch: str = ""):
    """Initialise the student's trunk from another run, an export or a published weight file
    (simmatch/weights.py); the classifier is kept when its shape matches."""
    from simmatch.weights import init_backbone

    backbone = method.student.backbone
    return init_backbone(backbone, path, arch or type(backbone).__name__)
