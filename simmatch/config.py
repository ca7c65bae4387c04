"""Typed run configuration: YAML files and dotted overrides into one dataclass tree.

Defaults live only in the dataclasses below. A YAML file (optionally naming a `base:` file
it extends) and `key=value` overrides are merged on top; an unknown key or a value of the
wrong type is a `ConfigError` naming the key and its source. Values that follow from the
config and the data (scaled LR, steps per epoch, bank size) are computed once, in `derive`.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from simmatch.errors import ConfigError


@dataclass
class DataConfig:
    """Where the images are and how each stream decodes and augments them."""

    root: str = ""  # ImageNet-style tree: root/train/<class>/*, root/val/<class>/*
    train_dir: str = "train"
    val_dir: str = "val"
    # file of labeled image paths (relative to train_dir, or bare file names), one per line;
    # `shipped:<name>` names a list shipped with the package (simmatch/splits/<name>)
    labeled_list: str = ""
    labeled_percent: float = 0.0  # used when labeled_list is empty
    labeled_per_class: int = 0  # used when labeled_list is empty and labeled_percent is 0
    unlabeled_list: str = ""  # default: every training image
    # The unlabeled set: `all` training images (of unlabeled_list if given) or their
    # `complement` with the labeled list (the authors' ImageNet runs).
    unlabeled: Literal["all", "complement"] = "all"
    # Training images the data set has, declared: only `--print-config` / `--dry-run` use it,
    # to show the recipe where the data tree is absent (ImageNet-1k: 1,281,167). 0: unknown.
    num_train_images: int = 0
    split_seed: int = 0
    num_classes: int = 1000
    backend: Literal["dali", "torch", "synthetic"] = "dali"
    device: Literal["auto", "gpu", "cpu"] = "auto"
    crop_size: int = 224
    val_resize: int = 256  # shorter side before the center crop
    min_scale: float = 0.2
    max_scale: float = 1.0
    strong: Literal["simclr", "randaugment"] = "simclr"
    jitter: float = 0.4  # brightness, contrast, saturation strength
    hue: float = 0.1
    jitter_prob: float = 0.8
    gray_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma_min: float = 0.1
    blur_sigma_max: float = 2.0
    randaug_n: int = 2
    randaug_m: int = 10
    num_strong: int = 1  # strong views per unlabeled image (augmentation anchoring)
    num_threads: int = 4
    prefetch: int = 2
    hw_decoder_load: float = 0.65
    # nvJPEG pre-allocation of the GPU (`mixed`) decoders, so large images do not reallocate
    decoder_width_hint: int = 5980  # hardware decoder: sized for ImageNet's largest image
    decoder_height_hint: int = 6430
    host_padding_mb: int = 16  # pinned host: 2 buffers per decoder thread (dali_pinned_estimate)
    device_padding_mb: int = 64  # GPU memory: 1 buffer per decoder thread
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    synthetic_size: int = 1024  # images per split for the synthetic backend
    val_batch: int = 0  # per-rank validation batch; 0: the per-rank unlabeled batch (B * mu)
    check_images: bool = True  # decode every val and labeled image before the first step


@dataclass
class ModelConfig:
    arch: str = "resnet50"  # a torchvision ResNet name, or resnet10 (one block per stage)
    small_input: bool = False  # 3x3 stride-1 stem and no max-pool, for images of 32 px or less
    proj_dim: int = 128  # output of the projection head (0: no head)
    proj_hidden: int = 0  # hidden width of the projection head; 0: the trunk's feature width
    proj_bn: bool = False  # BatchNorm1d in the head's hidden layer (ISD: yes; SimMatch: no)
    ema_momentum: float = 0.999
    # eman: EMA of parameters and BN buffers, eval mode. ema_shuffle_bn: EMA of parameters only,
    # train mode (BN on batch statistics) with shuffle-BN across ranks (SimMatch's published runs,
    # MoCo, ISD). Only a teacher that makes targets runs this way; FixMatch's and the supervised
    # baseline's EMA is only evaluated and always eman.
    teacher: Literal["eman", "ema_shuffle_bn"] = "eman"
    init_from: str = ""  # run directory or checkpoint whose trunk initialises the student


@dataclass
class MethodConfig:
    name: Literal["simmatch", "fixmatch", "supervised", "isd"] = "simmatch"
    tau: float = 0.7  # confidence threshold of SimMatch's class pseudo-label
    fixmatch_tau: float = 0.95  # FixMatch's threshold (its paper: 0.95 CIFAR/SVHN/STL, 0.7 ImageNet)
    use_bank: bool = True  # false: SimMatch without the labeled bank (no L_in, no propagation)
    temperature: float = 0.1  # t of the similarity softmax
    alpha: float = 0.9  # blend of p_w and the aggregated q_w
    lambda_u: float = 10.0
    lambda_in: float = 5.0
    dist_align: bool = True
    da_len: int = 256
    # uniform: SimMatch's DA (da_len batch means, uniform target); labeled: ReMixMatch's DA
    # (remixmatch_da_len-entry average initialised uniform, labeled-label marginal as target)
    # followed by its sharpening with remixmatch_t
    da_target: Literal["uniform", "labeled"] = "uniform"
    remixmatch_da_len: int = 128
    remixmatch_t: float = 0.5
    bank_momentum: float = 0.0  # 0: overwrite rows; >0: temporal ensemble (small K)
    propagate_after_epochs: int = 0  # official: L_in and aggregation start after epoch 0
    # ISD (self-supervised): queue of teacher embeddings and the two temperatures
    queue_size: int = 128_000
    isd_t_student: float = 0.1
    isd_t_teacher: float = 0.01
    predictor_hidden: int = 512
    predictor_bn: bool = True


@dataclass
class OptimConfig:
    lr: float = 0.03
    base_batch: int = 64  # lr is given for this global labeled batch and scaled linearly
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    decay_bn_bias: bool = False  # True restores the official decay of BN and biases
    warmup_epochs: float = 5.0
    epochs: float = 400.0
    iters: int = 0  # >0 overrides epochs: total optimizer steps (per_gpu: of the reference batch)
    impl: Literal["foreach", "fused", "plain"] = "foreach"


@dataclass
class TrainConfig:
    # How the batch follows the world size. fixed_global: `batch_size` images over all ranks
    # (the per-rank batch shrinks as ranks are added). per_gpu: `batch_per_gpu` per rank, the
    # global batch grows with the ranks and every per-step quantity (lr, teacher momentum, DA
    # length, step counts and intervals) is converted from the reference global labeled batch
    # optim.base_batch so that it stays the same in images seen (see `derive`).
    scale: Literal["fixed_global", "per_gpu"] = "fixed_global"
    batch_size: int = 64  # global labeled batch, divided over the ranks (scale=fixed_global)
    batch_per_gpu: int = 0  # labeled images per rank (scale=per_gpu)
    mu: int = 5  # unlabeled images per labeled image
    # Ranks whose BN statistics are pooled (SyncBatchNorm over groups of consecutive ranks);
    # 1: per-rank BN (the authors'); 0: the smallest group that reaches min_bn_images.
    bn_group_ranks: int = 1
    # Refuse a run whose BN groups see fewer images per forward than this (0: no check).
    min_bn_images: int = 0
    # The epoch's last incomplete global batch: pad (repeat items cyclically, every image every
    # epoch: steps = ceil) or drop (the authors' drop_last: steps = floor(N / global batch)).
    partial_batch: Literal["pad", "drop"] = "pad"
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"  # auto: bf16 on GPU, none on CPU
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    # Intervals in steps (scale=per_gpu: steps of the reference batch optim.base_batch)
    log_every: int = 50
    ckpt_every: int = 1000
    keep_ckpts: int = 3
    async_ckpt: bool = True  # write checkpoints in a background thread after a host copy
    eval_every: int = 0  # 0: only at the end
    knn_k: int = 20  # k-NN evaluation (methods without a trained classifier, tools/eval.py --knn)
    knn_temperature: float = 0.07
    max_nonfinite_steps: int = 3  # stop when the loss is NaN/inf for more consecutive steps
    tensorboard: bool = False  # scalars of every metrics.jsonl record under RUN_DIR/tensorboard
    wandb: bool = False  # the same records to Weights & Biases (WANDB_MODE=offline honoured)
    wandb_project: str = "simmatch"
    run_dir: str = ""  # default: <output_root>/<config name>
    output_root: str = "runs"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = ""


# Images per rank that go through BN in one forward, as multiples of (labeled, unlabeled)
# per-rank batches: the student's cat(labeled, strong) and the teacher's cat(labeled, weak).
_BN_STREAMS = {"supervised": (1, 0), "isd": (0, 1)}


@dataclass
class Scale:
    """Batches and every per-step quantity at a world size (no data needed)."""

    world_size: int
    batch_per_rank: int  # labeled images per rank per step
    unlabeled_per_rank: int
    global_batch: int  # labeled images per step over all ranks
    global_unlabeled: int
    step_scale: float  # images seen per step relative to the reference batch (per_gpu), else 1
    lr: float  # linear rule: optim.lr x global labeled batch / optim.base_batch
    ema_momentum: float  # model.ema_momentum ** step_scale
    da_len: int  # batch means in the DA queue: method.da_len / step_scale, rounded, >= 1
    remixmatch_da_len: int  # the same for ReMixMatch's buffer (method.da_target=labeled)
    bn_group_ranks: int
    bn_group_images: int  # images in one BN batch (the smaller of student and teacher forward)
    log_every: int
    ckpt_every: int
    eval_every: int


@dataclass
class Derived(Scale):
    """Values that follow from the config, the world size and the data; computed in one place."""

    steps_per_epoch: int = 1  # one epoch = one pass over the unlabeled set
    total_iters: int = 1
    warmup_iters: int = 0
    propagate_after_iters: int = 0  # the iteration at which L_in and aggregation start
    num_labeled: int = 0  # K, the bank size
    num_unlabeled: int = 0


def _per_step(value: int, step_scale: float) -> int:
    """A count of steps at the reference batch, in steps of this batch (nearest, >= 1)."""
    return max(1, round(value / step_scale))


def steps_per_epoch(num_items: int, global_batch: int, partial_batch: str) -> int:
    """Global batches in one pass over `num_items`: ceil (pad) or floor (drop), at least 1."""
    per = max(1, global_batch)
    steps = num_items // per if partial_batch == "drop" else -(-num_items // per)
    return max(1, steps)


def derive_scale(cfg: Config, world_size: int) -> Scale:
    """Batches, lr, teacher momentum, DA length, intervals and BN groups at `world_size`.

    scale=per_gpu: the global batch is batch_per_gpu x world size and every quantity the
    config gives per step is converted so that it is the same in images seen: with
    k = global labeled batch / optim.base_batch, lr x k, momentum ** k, DA queue length / k
    (nearest integer, ties to even, at least 1), step intervals and optim.iters / k.
    scale=fixed_global: the global batch is train.batch_size; only the lr follows the linear
    rule. Refuses BN groups smaller than train.min_bn_images.
    """
    t = cfg.train
    if world_size < 1:
        raise ConfigError(f"world size {world_size} must be at least 1")
    if t.scale == "per_gpu":
        if t.batch_per_gpu <= 0:
            raise ConfigError(f"train.scale=per_gpu needs train.batch_per_gpu > 0 (it is {t.batch_per_gpu})")
        per_rank = t.batch_per_gpu
    else:
        if t.batch_size % world_size != 0:
            raise ConfigError(
                f"train.batch_size={t.batch_size} does not divide by the world size {world_size}")
        per_rank = t.batch_size // world_size
    glob = per_rank * world_size
    k = glob / cfg.optim.base_batch if t.scale == "per_gpu" else 1.0
    lab, unl = _BN_STREAMS.get(cfg.method.name, (1, 1))
    rank_images = per_rank * lab + per_rank * t.mu * unl
    group = t.bn_group_ranks
    if group == 0:  # the smallest divisor of the world size whose group reaches the minimum
        group = next((g for g in range(1, world_size + 1)
                      if world_size % g == 0 and g * rank_images >= t.min_bn_images), world_size)
    if world_size % group != 0:
        raise ConfigError(f"train.bn_group_ranks={group} does not divide the world size {world_size}")
    bn_images = group * rank_images
    if bn_images < t.min_bn_images:
        raise ConfigError(
            f"BN groups would see {bn_images} images ({group} rank(s) x {rank_images}) at world size "
            f"{world_size}, fewer than train.min_bn_images={t.min_bn_images}: use train.scale=per_gpu, "
            f"a larger train.bn_group_ranks (or 0: automatic), or lower train.min_bn_images to accept it")
    return Scale(
        world_size=world_size, batch_per_rank=per_rank, unlabeled_per_rank=per_rank * t.mu,
        global_batch=glob, global_unlabeled=glob * t.mu, step_scale=k,
        lr=cfg.optim.lr * glob / cfg.optim.base_batch,
        ema_momentum=cfg.model.ema_momentum ** k,
        da_len=_per_step(cfg.method.da_len, k),
        remixmatch_da_len=_per_step(cfg.method.remixmatch_da_len, k),
        bn_group_ranks=group, bn_group_images=bn_images,
        log_every=_per_step(t.log_every, k), ckpt_every=_per_step(t.ckpt_every, k),
        eval_every=_per_step(t.eval_every, k) if t.eval_every > 0 else 0,
    )


def derive(cfg: Config, world_size: int, num_labeled: int, num_unlabeled: int) -> Derived:
    """Compute everything that depends on the config together with the run's environment."""
    s = derive_scale(cfg, world_size)
    uses_unlabeled = cfg.method.name != "supervised"
    denom = s.global_unlabeled if uses_unlabeled else s.global_batch
    pool = num_unlabeled if uses_unlabeled else num_labeled
    steps = steps_per_epoch(pool, denom, cfg.train.partial_batch)
    if cfg.optim.iters > 0:
        total = _per_step(cfg.optim.iters, s.step_scale)
    else:
        total = max(1, round(cfg.optim.epochs * steps))
    return Derived(
        **dataclasses.asdict(s),
        steps_per_epoch=steps,
        total_iters=total,
        warmup_iters=round(cfg.optim.warmup_epochs * steps),
        propagate_after_iters=cfg.method.propagate_after_epochs * steps,
        num_labeled=num_labeled,
        num_unlabeled=num_unlabeled,
    )


# --------------------------------------------------------------------------- loading

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotated type; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{source}: {key}={value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key, source)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: {key} has unsupported type {_type_name(tp)}")


def _merge(obj: Any, updates: dict, source: str, prefix: str = "") -> None:
    """Write `updates` into the dataclass `obj` in place, rejecting unknown keys."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        full = prefix + str(key)
        if key not in names:
            raise ConfigError(f"{source}: unknown config key '{full}'")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, source, full + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], full, source))


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[dict, str]]:
    """The file's mapping, preceded by those of the files it names as `base`."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    layers: list[tuple[dict, str]] = []
    base = data.pop("base", None)
    if base:
        base_path = (path.parent / base).resolve()
        if base_path in seen:
            raise ConfigError(f"{path}: base '{base}' forms a cycle")
        layers += _read_yaml(base_path, seen + (path.resolve(),))
    layers.append((data, str(path)))
    return layers


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value parsed as YAML, so numbers, booleans and lists work)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (and its bases), then each `key=value` override."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        for data, source in _read_yaml(path):
            _merge(cfg, data, source)
        if not cfg.name:
            cfg.name = path.stem
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply `key=value` overrides in place, then validate the whole config."""
    for text in overrides:
        key, value = parse_override(text)
        _merge(cfg, _nest(key, value), "command line")
    validate(cfg)
    return cfg


def choices(obj: Any, prefix: str = "") -> dict[str, tuple]:
    """Every `Literal[...]` field of the dataclass tree `obj`: dotted key -> allowed values."""
    out: dict[str, tuple] = {}
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(choices(value, f"{prefix}{f.name}."))
        elif typing.get_origin(hints[f.name]) is Literal:
            out[prefix + f.name] = typing.get_args(hints[f.name])
    return out


@dataclass(frozen=True)
class Range:
    """The valid interval of a numeric field (of each item, for a list); never NaN or inf."""

    lo: float
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def __str__(self) -> str:
        hi = "inf)" if math.isinf(self.hi) else f"{self.hi:g}{')' if self.hi_open else ']'}"
        return f"{'(' if self.lo_open else '['}{self.lo:g}, {hi}"


def _ge(lo: float) -> Range:
    return Range(lo)


def _gt(lo: float) -> Range:
    return Range(lo, lo_open=True)


_UNIT = Range(0.0, 1.0)
_COUNT = _ge(1)  # a positive integer
_NONNEG = _ge(0)

# The valid range of every numeric config field, checked by `validate` (tests/test_config.py
# checks that no int or float field is missing here).
RANGES: dict[str, Range] = {
    "data.labeled_percent": Range(0.0, 100.0),
    "data.labeled_per_class": _NONNEG,
    "data.split_seed": _NONNEG,
    "data.num_classes": _COUNT,
    "data.crop_size": _COUNT,
    "data.val_resize": _COUNT,
    "data.min_scale": Range(0.0, 1.0, lo_open=True),
    "data.max_scale": Range(0.0, 1.0, lo_open=True),
    "data.jitter": _NONNEG,
    "data.hue": Range(0.0, 0.5),
    "data.jitter_prob": _UNIT,
    "data.gray_prob": _UNIT,
    "data.blur_prob": _UNIT,
    "data.blur_sigma_min": _gt(0),
    "data.blur_sigma_max": _gt(0),
    "data.randaug_n": _NONNEG,
    "data.randaug_m": Range(0, 30),
    "data.num_strong": _COUNT,
    "data.num_threads": _NONNEG,  # 0: torch DataLoader without worker processes; DALI needs 1+
    "data.prefetch": _COUNT,
    "data.hw_decoder_load": _UNIT,
    "data.decoder_width_hint": _NONNEG,
    "data.decoder_height_hint": _NONNEG,
    "data.host_padding_mb": _NONNEG,
    "data.device_padding_mb": _NONNEG,
    "data.mean": _UNIT,
    "data.std": _gt(0),
    "data.synthetic_size": _COUNT,
    "data.val_batch": _NONNEG,
    "model.proj_dim": _COUNT,
    "model.proj_hidden": _NONNEG,
    "model.ema_momentum": _UNIT,
    "method.tau": _UNIT,
    "method.fixmatch_tau": _UNIT,
    "method.remixmatch_da_len": _COUNT,
    "method.remixmatch_t": _gt(0),
    "method.temperature": _gt(0),
    "method.alpha": _UNIT,
    "method.lambda_u": _NONNEG,
    "method.lambda_in": _NONNEG,
    "method.da_len": _COUNT,
    "method.bank_momentum": Range(0.0, 1.0, hi_open=True),
    "method.propagate_after_epochs": _NONNEG,
    "method.queue_size": _COUNT,
    "method.isd_t_student": _gt(0),
    "method.isd_t_teacher": _gt(0),
    "method.predictor_hidden": _COUNT,
    "optim.lr": _gt(0),
    "optim.base_batch": _COUNT,
    "optim.momentum": Range(0.0, 1.0, hi_open=True),
    "optim.weight_decay": _NONNEG,
    "optim.warmup_epochs": _NONNEG,
    "optim.epochs": _gt(0),
    "optim.iters": _NONNEG,
    "train.batch_size": _COUNT,
    "train.mu": _COUNT,
    "train.seed": _NONNEG,
    "train.log_every": _COUNT,
    "train.ckpt_every": _COUNT,
    "train.keep_ckpts": _COUNT,
    "train.eval_every": _NONNEG,
    "train.knn_k": _COUNT,
    "train.knn_temperature": _gt(0),
    "train.max_nonfinite_steps": _NONNEG,
    "train.batch_per_gpu": _NONNEG,
    "train.bn_group_ranks": _NONNEG,
    "train.min_bn_images": _NONNEG,
    "data.num_train_images": _NONNEG,
}


def _check_range(key: str, value: Any, rng: Range) -> None:
    items = value if isinstance(value, list) else [value]
    for item in items:
        if item not in rng:
            shown = f"{key}={value}" if isinstance(value, list) else f"{key}={item!r}"
            what = "is not a finite number" if not math.isfinite(item) else "is out of range"
            raise ConfigError(f"{shown} {what}: valid range {rng}")


def validate(cfg: Config) -> None:
    """Reject values that type-check but cannot work: choices, ranges, relations between keys."""
    for key, allowed in choices(cfg).items():  # also catches values set in code, not loaded
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")
    if cfg.method.name == "fixmatch" and cfg.method.da_target != "uniform":
        raise ConfigError("method.da_target=labeled applies to simmatch only: FixMatch aligns no distribution")
    for key, rng in RANGES.items():
        section, name = key.split(".")
        _check_range(key, getattr(getattr(cfg, section), name), rng)
    if cfg.data.backend == "dali" and cfg.data.num_threads < 1:
        raise ConfigError(f"data.num_threads={cfg.data.num_threads} is out of range for data.backend=dali: "
                          f"valid range {_COUNT} (0, no worker processes, is for data.backend=torch)")
    if cfg.train.scale == "per_gpu" and cfg.train.batch_per_gpu <= 0:
        raise ConfigError("train.scale=per_gpu needs train.batch_per_gpu > 0")
    if cfg.data.min_scale > cfg.data.max_scale:
        raise ConfigError(f"data.min_scale={cfg.data.min_scale} is above "
                          f"data.max_scale={cfg.data.max_scale}")
    if cfg.data.blur_sigma_min > cfg.data.blur_sigma_max:
        raise ConfigError(f"data.blur_sigma_min={cfg.data.blur_sigma_min} is above "
                          f"data.blur_sigma_max={cfg.data.blur_sigma_max}")
    for key in ("data.mean", "data.std"):
        value = getattr(cfg.data, key.split(".")[1])
        if len(value) != 3:
            raise ConfigError(f"{key}={value} must have 3 values (R, G, B)")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, source: str = "saved config") -> Config:
    cfg = Config()
    _merge(cfg, data, source)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config (atomically) so that the run can be reproduced."""
    from simmatch.checkpoint import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))
