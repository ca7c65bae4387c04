"""Trained weights out of a run: a plain torchvision ResNet (or Wide ResNet) state_dict (.pth and
.safetensors with a model card), or ONNX.

The export is verified before it gets its name: every file is written under a temporary name,
read back, and the logits of the plain model loaded from it (strict=True) must equal the
training model's (onnxruntime's within a tolerance); only then are the files renamed into place.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from simmatch.config import Config
from simmatch.errors import CheckpointError, UserError
from simmatch.files.atomic import replace_together
from simmatch.models.wrn import ARCHS as WRN_ARCHS
from simmatch.models.wrn import build_source as wrn_build_source
from simmatch.weights.networks import (
    describe,
    load_run_checkpoint,
    network_state,
    split_backbone,
    torchvision_model,
    training_network,
)


@torch.no_grad()
def verify(cfg: Config, net_state: dict, backbone: dict, size: int | None = None) -> float:
    """Max |logit difference| between the training model and the exported plain model."""
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
    from simmatch.errors import UserError
    from simmatch.shards.formats import data_format

    try:
        return data_format(cfg.data).split("train")[0].classes
    except UserError:  # no data here
        return []


def evaluation_card(records: list[dict], iteration: int, which: str) -> dict[str, str]:
    """The validation result of the exported network, for the model card: from the newest `eval`
    record of metrics.jsonl (`records`) at the checkpoint's iteration, `{which}_top1` and
    `{which}_top5` (or `{which}_knn_top1`, methods without a classifier) as `val_top1`, `val_top5`
    (`val_knn_top1`), `val_iteration` and `val_images` where the record counts them; `evaluation`
    says it in words, or that these weights were not evaluated."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    for record in reversed(records):
        if record.get("kind") != "eval" or not number(record.get("iteration")) or record["iteration"] != iteration:
            continue
        found = {f"val_{key}": record[f"{which}_{key}"] for key in ("top1", "top5", "knn_top1")
                 if number(record.get(f"{which}_{key}"))}
        if not found:
            continue
        card = {key: json.dumps(value) for key, value in found.items()}
        card["val_iteration"] = str(iteration)
        named = {"val_top1": "top-1", "val_top5": "top-5", "val_knn_top1": "k-NN top-1"}
        words = ", ".join(f"{named[key]} {value:.2f}%" for key, value in found.items())
        images = record.get("val_images")
        if number(images) and float(images).is_integer():
            card["val_images"] = str(int(images))
            words += f" of {int(images)} images"
        card["evaluation"] = f"{which} on the validation split at iteration {iteration}: {words}"
        return card
    return {"evaluation": f"not evaluated: metrics.jsonl has no evaluation of the {which} at iteration {iteration}"}


def run_evaluation(checkpoint: Path, iteration: int, which: str) -> dict[str, str]:
    """evaluation_card from the metrics.jsonl of the run directory holding `checkpoint`
    (RUN_DIR/checkpoints/FILE); a checkpoint kept elsewhere has no evaluation to read."""
    from simmatch.run.jsonl import read_records
    from simmatch.run.rundir import RunDir

    checkpoint = Path(checkpoint)
    run_dir = RunDir(checkpoint.parent.parent)
    metrics = run_dir.metrics if checkpoint.parent == run_dir.checkpoints else None
    if metrics is None or not metrics.is_file():
        return {"evaluation": f"unknown: {checkpoint} is not in a run directory with a metrics.jsonl"}
    return evaluation_card(read_records(metrics), iteration, which)


def model_card(cfg: Config, state: dict, which: str, checkpoint: str | Path | None = None) -> dict[str, str]:
    """What a stranger needs to rebuild and feed the model (string values: safetensors and ONNX
    metadata), and, given the `checkpoint` file it came from, how the exported network did on the
    validation split (run_evaluation). Preprocessing: shorter side to `resize`, center crop `crop`,
    RGB in [0, 1] normalised with `mean` / `std`."""
    from simmatch.data.base import val_resize_size

    classes = class_names(state, cfg)
    wrn = cfg.model.arch in WRN_ARCHS
    card = {"format": "WideResNet state_dict (plain torch, defined in build)" if wrn
            else "torchvision.models.ResNet state_dict", "arch": cfg.model.arch,
            "small_input_stem": json.dumps(cfg.model.small_input), "num_classes": str(cfg.data.num_classes),
            "resize": str(val_resize_size(cfg.data)), "crop": str(cfg.data.crop_size),
            "mean": json.dumps(list(cfg.data.mean)), "std": json.dumps(list(cfg.data.std)),
            "which": which, "method": cfg.method.name}
    if "authors" in state:  # one of the SimMatch / SimMatchV2 authors' files: their code wrote it, not a run
        card["source"] = state["authors"].describe()
        if state["epoch"] is not None:
            card["epoch"] = str(state["epoch"])
    else:
        card["iteration"] = str(int(state["iteration"]))
    if cfg.model.norm_feat:  # SimMatchV2's feature LayerNorm, the first layer of fc
        card["fc"] = "Sequential(LayerNorm(in_features), Linear(in_features, num_classes))"
    if cfg.model.arch != "resnet10" and not wrn:  # a torchvision constructor exists only for torchvision's own
        card["constructor"] = f"torchvision.models.{cfg.model.arch}"
    card["build"] = build_lines(cfg)
    if classes:
        card["classes"] = json.dumps(classes)
    if checkpoint is not None and "authors" in state:
        card["evaluation"] = f"unknown: {checkpoint} is {state['authors'].describe()}, not a run directory's"
    elif checkpoint is not None:
        card.update(run_evaluation(checkpoint, int(state["iteration"]), which))
    return card


def build_lines(cfg: Config) -> str:
    """Python that builds the exported architecture as `model` with torch and torchvision only
    (then `model.load_state_dict(torch.load(FILE.pth))`): the model card's `build`. For a Wide
    ResNet, torch only: the source of models/wrn.py's WideBlock and WideResNet, which the training
    network runs, and the constructor call."""
    n = cfg.data.num_classes
    if cfg.model.arch in WRN_ARCHS:
        lines = [wrn_build_source(cfg.model.arch, n)]
        if cfg.model.norm_feat:
            lines.append("model.fc = nn.Sequential(nn.LayerNorm(model.fc.in_features), model.fc)")
        return "\n".join(lines)
    if cfg.model.arch == "resnet10":  # one BasicBlock per stage: no torchvision constructor
        lines = ["from torchvision.models.resnet import ResNet, BasicBlock",
                 f"model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes={n})"]
    else:
        lines = ["import torchvision", f"model = torchvision.models.{cfg.model.arch}(num_classes={n})"]
    if cfg.model.small_input or cfg.model.norm_feat:
        lines.insert(0, "import torch.nn as nn")
    if cfg.model.small_input:
        lines += ["model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)",
                  "model.maxpool = nn.Identity()"]
    if cfg.model.norm_feat:
        lines.append("model.fc = nn.Sequential(nn.LayerNorm(model.fc.in_features), model.fc)")
    return "\n".join(lines)


def export(path: str | Path, which: str, out: str | Path, head_out: str | Path | None = None,
           which_ckpt: str = "last", cfg_path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
           ) -> dict:
    """Write `out` with .pth and .safetensors suffixes; returns what was written and the check.

    Every file is first written under a temporary name; the check reads those files back
    (both formats) and compares the logits of a torchvision model loaded from them with the
    training model's. Only when they are equal are the files renamed into place; otherwise
    they are removed and nothing is left behind (`written` is then empty). `cfg_path` and
    `overrides`: the config of an authors' file (load_run_checkpoint).
    """
    from safetensors.torch import load_file, save_file

    file, state, cfg = load_run_checkpoint(path, which_ckpt, cfg_path, overrides)
    net_state = network_state(state, which, file)
    training_network(cfg, net_state)  # weights that do not fit the config: one line, before anything is written
    backbone, head = split_backbone(net_state)
    out = Path(out)
    stem = out.with_suffix("") if out.suffix in (".pth", ".pt", ".safetensors", ".onnx") else out
    targets = [stem.with_suffix(".pth"), stem.with_suffix(".safetensors")]
    if head_out and head:
        targets.append(Path(head_out))
    contiguous = {k: v.contiguous() for k, v in backbone.items()}
    card = model_card(cfg, state, which, file)
    diff = float("nan")

    def write(tmps: list[Path]) -> None:
        torch.save(contiguous, tmps[0])
        save_file(contiguous, str(tmps[1]), metadata=card)
        os.chmod(tmps[1], os.stat(tmps[0]).st_mode & 0o777)  # safetensors writes 0600: the .pth's mode (umask)
        if len(tmps) > 2:
            torch.save({k: v.contiguous() for k, v in head.items()}, tmps[2])

    def check(tmps: list[Path]) -> bool:
        nonlocal diff
        diff = max(verify(cfg, net_state, written) for written in
                   (torch.load(tmps[0], map_location="cpu", weights_only=True), load_file(str(tmps[1]))))
        return diff == 0.0

    try:
        replace_together(targets, write, check)
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"export to {stem} failed: {str(exc).splitlines()[0]}") from None
    return {"checkpoint": file, "iteration": None if "authors" in state else int(state["iteration"]),
            "source": describe(state), "arch": cfg.model.arch,
            "small_input": cfg.model.small_input, "max_abs_diff": diff,
            "written": targets if diff == 0.0 else [], "metadata": card}


ONNX_TOLERANCE = 1e-4  # max |logit difference| between onnxruntime and PyTorch (float32, CPU)


def export_onnx(path: str | Path, which: str, out: str | Path, which_ckpt: str = "last",
                tolerance: float = ONNX_TOLERANCE, cfg_path: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Write `out` (.onnx, batch dimension dynamic, input `image` [N,3,crop,crop] normalised,
    output `logits`), with the model card as ONNX metadata; onnxruntime must reproduce the
    PyTorch logits within `tolerance` on a batch of another size before the file gets its name."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise UserError("--format onnx needs the onnx and onnxruntime packages "
                        "(pip install onnx onnxruntime, or the `onnx` extra)") from None
    file, state, cfg = load_run_checkpoint(path, which_ckpt, cfg_path, overrides)
    net_state = network_state(state, which, file)
    training_network(cfg, net_state)  # weights that do not fit the config: one line
    backbone, _ = split_backbone(net_state)
    model = torchvision_model(cfg)
    model.load_state_dict(backbone, strict=True)
    model.eval()
    size = cfg.data.crop_size
    card = model_card(cfg, state, which, file)
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
    replace_together([out], write, check)
    return {"checkpoint": file, "iteration": None if "authors" in state else int(state["iteration"]),
            "source": describe(state), "arch": cfg.model.arch,
            "small_input": cfg.model.small_input, "max_abs_diff": result["max_abs_diff"],
            "tolerance": tolerance, "written": [out], "metadata": card}
