"""The frozen network a transfer evaluation embeds with, and how its images are prepared: from an
export (tools/export.py: a torchvision state_dict .pth / .safetensors whose metadata is the model
card), another weight file, or this project's run directory or checkpoint (its own config).

Architecture and preprocessing come from the model card or the run's config; what neither gives
is taken from the command line, or refused in one line rather than guessed (except the stem,
which a ResNet's conv1 kernel shows).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torchvision

from simmatch.checkpoint.store import find_checkpoint, read_checkpoint
from simmatch.config import from_dict
from simmatch.errors import CheckpointError, ConfigError, UserError
from simmatch.files.atomic import file_sha256
from simmatch.models import Network
from simmatch.models.network import build_backbone
from simmatch.models.wrn import ARCHS as WRN_ARCHS
from simmatch.weights.init import map_onto_trunk, read_weights, strip_prefixes
from simmatch.weights.networks import network_state, training_network

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bicubic", "bilinear")


def known_archs() -> list[str]:
    """The architectures this project builds: resnet10, torchvision's ResNets, the Wide ResNets."""
    tv = sorted(name for name in dir(torchvision.models) if name.startswith(("resnet", "wide_resnet", "resnext"))
                and name != "resnet" and callable(getattr(torchvision.models, name)))
    return ["resnet10", *tv, *WRN_ARCHS]


@dataclass(frozen=True)
class Preprocess:
    """Shorter side to `resize` px, centre crop `crop` px, RGB in [0, 1] normalised (no augmentation)."""

    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"

    def text(self) -> str:
        return (f"shorter side {self.resize} px ({self.interpolation}), centre crop {self.crop} px, "
                f"mean {list(self.mean)}, std {list(self.std)}")


@dataclass
class FeatureModel:
    """A network whose `features(x)` is the pooled trunk output (the classifier dropped)."""

    net: Network
    arch: str
    small_input: bool
    preprocess: Preprocess
    file: Path  # the file the weights were read from (a run directory's chosen checkpoint)
    digest: str  # SHA-256 of that file's bytes (with `which`: part of the feature cache's key)
    kind: str  # export | weights | checkpoint
    which: str = ""  # student or teacher, for a checkpoint

    def identity(self) -> dict:
        """What the features depend on besides the images: the cache key's network part."""
        return {"digest": self.digest, "which": self.which, "arch": self.arch, "small_input": self.small_input,
                **asdict(self.preprocess)}


@dataclass
class Overrides:
    """The command line's answers where a weight file carries no model card (or to replace it)."""

    arch: str | None = None
    small_input: bool | None = None
    size: int | None = None  # crop, and the resize unless `resize` is given
    resize: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str = "bicubic"


def safetensors_card(path: Path) -> dict[str, str]:
    """The metadata of a .safetensors file (tools/export.py's model card); {} when it has none."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # not a safetensors file, truncated ...
        raise CheckpointError(f"WEIGHTS {path} cannot be read as safetensors: {str(exc).splitlines()[0]}") from None


def card_of(path: Path) -> tuple[dict[str, str], Path | None]:
    """The model card of a weight file: its own metadata (.safetensors), or that of the
    .safetensors export written beside a .pth one; ({}, None) when there is none."""
    candidates = [path] if path.suffix == ".safetensors" else [path.with_suffix(".safetensors")]
    for candidate in candidates:
        if candidate.is_file():
            card = safetensors_card(candidate)
            if card:
                return card, candidate
    return {}, None


def card_value(card: dict[str, str], key: str, where: Path | None):
    """A card entry parsed as JSON (its values are strings: numbers, lists and booleans as JSON)."""
    try:
        return json.loads(card[key])
    except (ValueError, TypeError):
        raise CheckpointError(f"the model card of {where} has an unreadable {key}: {card[key]!r}") from None


def resolve_preprocess(o: Overrides, resize: int | None, crop: int | None, mean, std) -> Preprocess:
    """The command line first (--size sets crop and resize, as the protocol resizes the shorter side
    to the crop), then the card's or the run's values, then 224 px and ImageNet's statistics."""
    crop = o.size or crop or 224
    resize = o.resize or (o.size if o.size else resize) or crop
    if resize < crop:
        raise UserError(f"the resize ({resize} px) is smaller than the crop ({crop} px): give --resize >= --size")
    return Preprocess(int(resize), int(crop), tuple(float(v) for v in (o.mean or mean or IMAGENET_MEAN)),
                      tuple(float(v) for v in (o.std or std or IMAGENET_STD)), o.interpolation)


def checked_arch(arch: str, what: str) -> str:
    if arch not in known_archs():
        raise UserError(f"{what} {arch!r} is not an architecture this project builds ({', '.join(known_archs())})")
    return arch


def from_checkpoint(file: Path, state: dict, which: str, o: Overrides) -> FeatureModel:
    """A training checkpoint: its own config gives the architecture and the validation preprocessing."""
    cfg = from_dict(state["config"], f"config inside {file}")
    if o.arch and o.arch != cfg.model.arch:
        raise UserError(f"--arch {o.arch}: the checkpoint {file} holds a {cfg.model.arch}")
    net = training_network(cfg, network_state(state, which))
    d = cfg.data
    return FeatureModel(net.eval(), cfg.model.arch, cfg.model.small_input,
                        resolve_preprocess(o, d.val_resize_px(), d.crop_size, d.mean, d.std),
                        file, file_sha256(file), "checkpoint", which)


def from_weights(path: Path, o: Overrides) -> FeatureModel:
    """An export or any ResNet weight file (read_weights: nestings and wrapper prefixes undone)."""
    card, where = card_of(path)
    arch = o.arch or card.get("arch")
    if not arch:
        sibling = path.with_suffix(".safetensors")
        where = ("its metadata has no arch" if path.suffix == ".safetensors" else
                 f"{sibling.name} beside it has no arch" if sibling.is_file() else f"no {sibling.name} beside it")
        raise UserError(f"WEIGHTS {path} has no model card naming its architecture ({where}): "
                        f"give --arch ({', '.join(known_archs())})")
    checked_arch(arch, "--arch" if o.arch else f"the model card of {where} names arch")
    weights = read_weights(path)
    small = o.small_input
    if small is None and "small_input_stem" in card:
        small = bool(card_value(card, "small_input_stem", where))
    if small is None:  # the stem shows in conv1: 3x3 for small inputs, 7x7 for ImageNet's
        conv1 = next((t for k, t in weights.items() if strip_prefixes(k) == "conv1.weight" and t.dim() == 4), None)
        small = conv1 is not None and conv1.shape[-1] == 3 and arch not in WRN_ARCHS
    fc = next((t for k, t in weights.items() if strip_prefixes(k) == "fc.weight" and t.dim() == 2), None)
    try:
        backbone = build_backbone(arch, int(fc.shape[0]) if fc is not None else 1000, small and arch not in WRN_ARCHS)
    except ConfigError as exc:
        raise UserError(f"WEIGHTS {path}: {exc}") from None
    try:
        state, _ = map_onto_trunk(weights, backbone.state_dict(), path, arch)
    except CheckpointError as exc:
        text = str(exc).replace("model.init_from=", "WEIGHTS ", 1)
        raise CheckpointError(text.replace(f"(this run is {arch} as configured)", f"(it is not a {arch})")) from None
    backbone.load_state_dict(state, strict=False)
    net = Network(backbone, proj_dim=0)
    values = {k: card_value(card, k, where) for k in ("resize", "crop", "mean", "std") if k in card}
    return FeatureModel(net.eval(), arch, bool(small),
                        resolve_preprocess(o, values.get("resize"), values.get("crop"), values.get("mean"),
                                           values.get("std")),
                        path, file_sha256(path), "export" if card else "weights")


def load_feature_model(source: str | Path, which: str = "teacher", which_ckpt: str = "last",
                       overrides: Overrides | None = None) -> FeatureModel:
    """The frozen network of WEIGHTS: a run directory (its `which_ckpt` checkpoint), a training
    checkpoint, an export (.pth / .safetensors with its model card) or another ResNet weight file."""
    o = overrides or Overrides()
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"WEIGHTS {path}: no such file or run directory")
    if path.is_dir():
        file, state = find_checkpoint(path, which_ckpt)
        if "method" not in state or "config" not in state:
            raise CheckpointError(f"WEIGHTS {file} is not a training checkpoint of this project")
        return from_checkpoint(Path(file), state, which, o)
    if path.suffix != ".safetensors":
        state = read_checkpoint(path)
        if "method" in state and "config" in state:
            return from_checkpoint(path, state, which, o)
        del state
    return from_weights(path, o)
