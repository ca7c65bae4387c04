"""Starting weights from other people's files: read the common layouts, map them onto the trunk.

Read (never unpickling arbitrary objects: torch.load(weights_only=True), or safetensors):
a plain state_dict (torchvision's published weight files are one), a dict nesting it under
`state_dict` / `model` (MoCo, ISD, timm, Lightning `.pth.tar` / `.ckpt`), `.safetensors`,
this project's run directories, checkpoints (`ckpt_300.pt` names the checkpoint of
iteration 300, `best.pt` / `last.pt` the stable names) and exports, and the SimMatch / SimMatchV2
authors' released checkpoints (`weights/authors.py`: their student `main`'s trunk and classifier).

Map: the wrapper prefixes `module.` (DataParallel/DDP), `encoder_q.` (MoCo's query encoder),
`backbone.`, `encoder.`, `model.` are stripped, then the names are matched against the
torchvision ResNet trunk. Another architecture (a trunk tensor of another shape, a trunk
layer the run does not have or lacks) is one error line; a classifier of another class count
and the tensors that are not part of a ResNet trunk (MoCo's key encoder and queue, projection
heads) are skipped and reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from simmatch.checkpoint.store import find_checkpoint, read_checkpoint
from simmatch.config import Config
from simmatch.errors import CheckpointError
from simmatch.weights.authors import trunk_of_authors

NESTING = ("state_dict", "model", "model_state_dict", "net", "network")
PREFIXES = ("module.", "encoder_q.", "backbone.", "encoder.", "model.")
CLASSIFIER = ("fc.weight", "fc.bias")


@dataclass
class InitReport:
    """What an initialisation took from its source: loaded, missing and unexpected names."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        def few(names: list[str]) -> str:
            return (": " + ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")) if names else ""

        return [f"init_from {self.source}: loaded {len(self.loaded)} tensors{few(self.loaded)}",
                f"init_from {self.source}: missing {len(self.missing)}{few(self.missing)}",
                f"init_from {self.source}: unexpected (not used) {len(self.unexpected)}{few(self.unexpected)}",
                *(f"init_from {self.source}: {n}" for n in self.notes)]


def _tensors(obj: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _unwrap(obj: dict) -> dict:
    """Descend through `state_dict` / `model` nestings to the dict that holds the tensors."""
    while not _tensors(obj):
        inner = next((obj[k] for k in NESTING if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    return obj


def read_weights(source: str | Path) -> dict[str, torch.Tensor]:
    """The named tensors of a weight file, an export, or a run's (student) trunk."""
    p = Path(source)
    if p.suffix == ".safetensors" and p.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as exc:  # not a safetensors file, truncated ...
            raise CheckpointError(f"model.init_from={p} cannot be read: {str(exc).splitlines()[0]}") from None
    if p.is_dir() or not p.exists():  # a run directory (its newest usable checkpoint), or a
        p, state = find_checkpoint(p)  # checkpoint named by its iteration
    else:
        state = read_checkpoint(p)
    if "method" in state and "config" in state:  # this project's training checkpoint
        prefix = "student.backbone."
        trunk = {k[len(prefix):]: v for k, v in state["method"].items() if k.startswith(prefix)}
        if not trunk:
            raise CheckpointError(f"model.init_from={p}: the checkpoint holds no ResNet backbone")
        return trunk
    return _tensors(_unwrap(state))


def strip_prefixes(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def map_onto_trunk(weights: dict[str, torch.Tensor], target: dict[str, torch.Tensor], source: str | Path,
                   arch: str) -> tuple[dict[str, torch.Tensor], InitReport]:
    """The tensors to load (strict=False) into a ResNet whose state is `target`, and the report."""
    report = InitReport(str(source))
    weights, authors = trunk_of_authors(weights)
    if authors:
        report.notes.append(authors)
    mapped: dict[str, tuple[str, torch.Tensor]] = {}
    for name, tensor in weights.items():
        mapped.setdefault(strip_prefixes(name), (name, tensor))
    trunk = [k for k in target if k not in CLASSIFIER]
    layers = {k.split(".")[0] for k in trunk}  # conv1, bn1, layer1 ... layer4
    out: dict[str, torch.Tensor] = {}
    for key in trunk:
        if key in mapped:
            tensor = mapped[key][1]
            if tensor.shape != target[key].shape:
                raise CheckpointError(f"model.init_from={source}: architecture mismatch at '{key}' (shape "
                                      f"{tuple(tensor.shape)}, this run's {arch} has {tuple(target[key].shape)})")
            out[key] = tensor
    if not out:
        names = ", ".join(list(weights)[:3]) or "no tensors at all"
        raise CheckpointError(f"model.init_from={source}: nothing in it maps onto the {arch} trunk "
                              f"(its names look like {names})")
    report.missing = [k for k in trunk if k not in out]
    stray = [k for k in mapped if k not in target and k.split(".")[0] in layers]
    absent = [k for k in report.missing if not k.endswith("num_batches_tracked")]
    if stray or absent:
        raise CheckpointError(f"model.init_from={source}: architecture mismatch at '{(stray or absent)[0]}' "
                              f"(this run is {arch} as configured)")
    head = [mapped[k][1] for k in CLASSIFIER if k in mapped]
    if len(head) == 2 and all(t.shape == target[k].shape for t, k in zip(head, CLASSIFIER)):
        out.update(zip(CLASSIFIER, head))
    skipped = bool(head) and "fc.weight" not in out
    if skipped:
        report.notes.append(f"classifier skipped: it has {head[0].shape[0]} classes, this run "
                            f"{target['fc.weight'].shape[0]}")
    report.loaded = list(out)
    used = set(out)
    report.unexpected = [orig for key, (orig, _) in mapped.items() if key not in used
                         and not (key in CLASSIFIER and skipped)]
    return out, report


def init_backbone(backbone: torch.nn.Module, source: str | Path, arch: str) -> InitReport:
    """Load `source` into a torchvision ResNet in place; the report says what was used."""
    state, report = map_onto_trunk(read_weights(source), backbone.state_dict(), source, arch)
    backbone.load_state_dict(state, strict=False)
    return report


def check_init_source(cfg: Config) -> None:
    """Fail before anything is written when model.init_from does not fit the configured model."""
    from simmatch.models.network import build_backbone

    target = build_backbone(cfg.model.arch, cfg.data.num_classes, cfg.model.small_input).state_dict()
    map_onto_trunk(read_weights(cfg.model.init_from), target, cfg.model.init_from, cfg.model.arch)


def init_student_from(method, path: str | Path, arch: str = ""):
    """Initialise the student's trunk from another run, an export or a published weight file
    (`read_weights`, `map_onto_trunk` above); the classifier is kept when its shape matches."""
    backbone = method.student.backbone
    return init_backbone(backbone, path, arch or type(backbone).__name__)
