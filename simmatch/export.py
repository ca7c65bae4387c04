"""Trained weights out of a run: a plain torchvision ResNet state_dict (.pth and .safetensors).

The student and teacher are `Network`s whose `backbone` is a torchvision ResNet with `fc`
as the classifier, so exporting is a prefix strip; the export is verified by comparing the
logits of a torchvision model loaded with strict=True against the training model's.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torchvision

from simmatch import checkpoint as ckpt
from simmatch.config import Config, from_dict
from simmatch.errors import CheckpointError, UserError
from simmatch.models import Network, network_for
from simmatch.models.network import resnet10

PREFIXES = {"student": "student.", "teacher": "teacher.module."}


def load_run_checkpoint(path: str | Path, which_ckpt: str = "last") -> tuple[Path, dict, Config]:
    """A training checkpoint (a file, or a run directory's `last` or `best` one) and its config."""
    file, state = ckpt.load_picked(path, which_ckpt)  # `last` falls back past damaged checkpoints
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
    net = network_for(cfg, head=has_head)
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


def class_names(state: dict, cfg: Config) -> list[str]:
    """Class names (wnids) in index order: saved in the checkpoint, else read from the data tree."""
    if state.get("classes"):
        return [str(c) for c in state["classes"]]
    train = Path(cfg.data.root) / cfg.data.train_dir
    if cfg.data.root and train.is_dir():
        from simmatch.data.splits import scan_tree

        return scan_tree(train).classes
    return []


def model_card(cfg: Config, state: dict, which: str) -> dict[str, str]:
    """What a stranger needs to rebuild and feed the model (string values: safetensors and ONNX
    metadata). Preprocessing: shorter side to `resize`, center crop `crop`, RGB in [0, 1]
    normalised with `mean` / `std`."""
    from simmatch.data.base import val_resize_size

    classes = class_names(state, cfg)
    card = {"format": "torchvision.models.ResNet state_dict", "arch": cfg.model.arch,
            "small_input_stem": json.dumps(cfg.model.small_input), "num_classes": str(cfg.data.num_classes),
            "resize": str(val_resize_size(cfg.data)), "crop": str(cfg.data.crop_size),
            "mean": json.dumps(list(cfg.data.mean)), "std": json.dumps(list(cfg.data.std)),
            "which": which, "iteration": str(int(state["iteration"])), "method": cfg.method.name}
    if classes:
        card["classes"] = json.dumps(classes)
    return card


def _atomic_outputs(paths: list[Path], write, check) -> bool:
    """Write every file under a temporary name next to its target, check them together, and
    rename them only if `check` returns True; nothing is left behind otherwise."""
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmps = [path.with_name(f".{path.name}.{os.getpid()}.tmp") for path in paths]
    try:
        write(tmps)
        if not check(tmps):
            return False
        for tmp, path in zip(tmps, paths):
            os.replace(tmp, path)
        return True
    finally:
        for tmp in tmps:
            if tmp.exists():
                tmp.unlink()


def export(path: str | Path, which: str, out: str | Path, head_out: str | Path | None = None,
           which_ckpt: str = "last") -> dict:
    """Write `out` with .pth and .safetensors suffixes; returns what was written and the check.

    Every file is first written under a temporary name; the check reads those files back
    (both formats) and compares the logits of a torchvision model loaded from them with the
    training model's. Only when they are equal are the files renamed into place; otherwise
    they are removed and nothing is left behind (`written` is then empty).
    """
    from safetensors.torch import load_file, save_file

    if which not in PREFIXES:
        raise UserError(f"--which must be student or teacher, not {which!r}")
    file, state, cfg = load_run_checkpoint(path, which_ckpt)
    net_state = network_state(state, which)
    backbone, head = split_backbone(net_state)
    out = Path(out)
    stem = out.with_suffix("") if out.suffix in (".pth", ".pt", ".safetensors", ".onnx") else out
    targets = [stem.with_suffix(".pth"), stem.with_suffix(".safetensors")]
    if head_out and head:
        targets.append(Path(head_out))
    contiguous = {k: v.contiguous() for k, v in backbone.items()}
    card = model_card(cfg, state, which)
    diff = float("nan")

    def write(tmps: list[Path]) -> None:
        torch.save(contiguous, tmps[0])
        save_file(contiguous, str(tmps[1]), metadata=card)
        if len(tmps) > 2:
            torch.save({k: v.contiguous() for k, v in head.items()}, tmps[2])

    def check(tmps: list[Path]) -> bool:
        nonlocal diff
        diff = max(verify(cfg, net_state, written) for written in
                   (torch.load(tmps[0], map_location="cpu", weights_only=True), load_file(str(tmps[1]))))
        return diff == 0.0

    try:
        _atomic_outputs(targets, write, check)
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"export to {stem} failed: {str(exc).splitlines()[0]}") from None
    return {"checkpoint": file, "iteration": int(state["iteration"]), "arch": cfg.model.arch,
            "small_input": cfg.model.small_input, "max_abs_diff": diff,
            "written": targets if diff == 0.0 else [], "metadata": card}


ONNX_TOLERANCE = 1e-4  # max |logit difference| between onnxruntime and PyTorch (float32, CPU)


def export_onnx(path: str | Path, which: str, out: str | Path, which_ckpt: str = "last",
                tolerance: float = ONNX_TOLERANCE) -> dict:
    """Write `out` (.onnx, batch dimension dynamic, input `image` [N,3,crop,crop] normalised,
    output `logits`), with the model card as ONNX metadata; onnxruntime must reproduce the
    PyTorch logits within `tolerance` on a batch of another size before the file gets its name."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise UserError("--format onnx needs the onnx and onnxruntime packages "
                        "(pip install onnx onnxruntime, or the `onnx` extra)") from None
    if which not in PREFIXES:
        raise UserError(f"--which must be student or teacher, not {which!r}")
    file, state, cfg = load_run_checkpoint(path, which_ckpt)
    backbone, _ = split_backbone(network_state(state, which))
    model = torchvision_model(cfg)
    model.load_state_dict(backbone, strict=True)
    model.eval()
    size = cfg.data.crop_size
    card = model_card(cfg, state, which)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    result: dict = {}

    def write(tmps: list[Path]) -> None:
        import warnings

        (tmp,) = tmps

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.zeros(2, 3, size, size),), str(tmp), input_names=["image"],
                              output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                              dynamo=False)
        proto = onnx.load(str(tmp))
        for key, value in card.items():
            proto.metadata_props.add(key=key, value=value)
        onnx.save(proto, str(tmp))

    def check(tmps: list[Path]) -> bool:
        (tmp,) = tmps
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(["logits"], {"image": x.numpy()})[0])
        with torch.no_grad():
            want = model(x)
        result["max_abs_diff"] = float((got - want).abs().max())
        if not result["max_abs_diff"] <= tolerance:
            raise CheckpointError(f"ONNX export of {file}: onnxruntime's logits differ from PyTorch's by "
                                  f"{result['max_abs_diff']:.3g} (tolerance {tolerance:g}); nothing written")
        return True

    out = Path(out)
    out = out if out.suffix == ".onnx" else out.with_suffix(".onnx")
    _atomic_outputs([out], write, check)
    return {"checkpoint": file, "iteration": int(state["iteration"]), "arch": cfg.model.arch,
            "small_input": cfg.model.small_input, "max_abs_diff": result["max_abs_diff"],
            "tolerance": tolerance, "written": [out], "metadata": card}


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
