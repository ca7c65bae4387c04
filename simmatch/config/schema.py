"""The run configuration's schema: one dataclass per section, every default, every valid range.

A numeric field carries its valid interval on the field itself (`num(default, Range)`), so a
new key cannot be added without one; `RANGES` collects them for `validate`. Literal fields
list their choices in the annotation. No torch here: the submitting machine stays light.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from simmatch.fields import COUNT, NONNEG, UNIT, Range, above, num
from simmatch.methods.card import card_of


@dataclass
class DataConfig:
    """Where the images are and how each stream decodes and augments them."""

    root: str = ""  # ImageNet-style tree: root/train/<class>/*, root/val/<class>/*
    # `folder`: the tree under root; `shards`: the tar shards and indexes tools/make_shards.py
    # packed from it into `shards` (same images, order and seeds: the same run, bit for bit);
    # `cifar10`, `cifar100`, `svhn`, `stl10`: the archives torchvision's data set classes download
    # into root (docs/DATA.md), read as they are: test split for validation
    format: Literal["folder", "shards", "cifar10", "cifar100", "svhn", "stl10"] = "folder"
    extra: bool = False  # svhn: extra_32x32.mat's 531,131 images join the training set (USB's reading)
    shards: str = ""
    max_open_shards: int = num(256, COUNT)  # shard files of each split a process keeps open (LRU closed)
    train_dir: str = "train"
    val_dir: str = "val"
    # file of labeled image paths (relative to train_dir, or bare file names), one per line;
    # `shipped:<name>` names a list shipped with the package (simmatch/splits/<name>)
    labeled_list: str = ""
    labeled_percent: float = num(0.0, Range(0.0, 100.0))  # used when labeled_list is empty
    labeled_per_class: int = num(0, NONNEG)  # used when labeled_list is empty and labeled_percent is 0
    unlabeled_list: str = ""  # default: every training image
    # The unlabeled set: `all` training images (of unlabeled_list if given) or their
    # `complement` with the labeled list (the authors' ImageNet runs).
    unlabeled: Literal["all", "complement"] = "all"
    # Training images the data set has, declared: only `--print-config` / `--dry-run` use it,
    # to show the recipe where the data tree is absent (ImageNet-1k: 1,281,167). 0: unknown.
    num_train_images: int = num(0, NONNEG)
    split_seed: int = num(0, NONNEG)
    # 0: the class folders of root/train_dir, counted when the config is loaded (1000, ImageNet's,
    # where there is no tree to count: the synthetic backend, a recipe printed without the data)
    num_classes: int = num(0, NONNEG)
    backend: Literal["dali", "torch", "synthetic"] = "dali"
    device: Literal["auto", "gpu", "cpu"] = "auto"
    crop_size: int = num(224, COUNT)
    # shorter side in pixels before the centre crop of crop_size (not below it); 0: crop_size x 256 / 224
    # (ImageNet's 256 / 224, 37 at a 32 px crop)
    val_resize: int = num(0, NONNEG)
    min_scale: float = num(0.2, Range(0.0, 1.0, lo_open=True))
    max_scale: float = num(1.0, Range(0.0, 1.0, lo_open=True))
    # The views' geometry: `crop`, RandomResizedCrop (ImageNet); `translate`, a reflect-padded random
    # crop of the image's own size, shifting it up to `translate` of its side (CIFAR, SVHN, STL-10)
    augment: Literal["crop", "translate"] = "crop"
    translate: float = num(0.125, Range(0.0, 0.5))
    flip: bool = True  # random horizontal flip of every training view (false: SVHN's digits)
    # The strong views' photometric part: SimCLR's colour ops, torchvision's RandAugment(n, m), or
    # FixMatch's RandAugment (`fixmatch_ra`: randaug_n ops of its 14, each with a random magnitude,
    # then, with `cutout`, a grey square of up to half the side; with augment=translate)
    strong: Literal["simclr", "randaugment", "fixmatch_ra"] = "simclr"
    cutout: bool = True
    jitter: float = num(0.4, NONNEG)  # brightness and contrast strength of the strong views' ColorJitter
    saturation: float = num(0.4, NONNEG)  # its saturation strength (SimMatchV2's multi-crop: 0.2)
    hue: float = num(0.1, Range(0.0, 0.5))
    jitter_prob: float = num(0.8, UNIT)
    gray_prob: float = num(0.2, UNIT)
    blur_prob: float = num(0.5, UNIT)
    blur_sigma_min: float = num(0.1, above(0))
    blur_sigma_max: float = num(2.0, above(0))
    solarize_prob: float = num(0.0, UNIT)  # PIL's solarize (threshold 128) last, with this probability
    randaug_n: int = num(2, NONNEG)
    randaug_m: int = num(10, Range(0, 30))
    num_strong: int = num(1, COUNT)  # strong views per unlabeled image (augmentation anchoring, multi-crop)
    # Multi-crop (SimMatchV2's --multicrop): strong view i is a crop of strong_sizes[i] px with
    # RandomResizedCrop scale [strong_min_scales[i], strong_max_scales[i]]; one entry per view
    # (num_strong of them). Empty: every strong view is crop_size px, scale [min_scale, max_scale].
    strong_sizes: list[int] = num(None, COUNT, list)
    strong_min_scales: list[float] = num(None, Range(0.0, 1.0, lo_open=True), list)
    strong_max_scales: list[float] = num(None, Range(0.0, 1.0, lo_open=True), list)
    num_threads: int = num(4, NONNEG)  # 0: torch DataLoader without worker processes; DALI needs 1+
    prefetch: int = num(2, COUNT)
    hw_decoder_load: float = num(0.65, UNIT)
    # nvJPEG pre-allocation of the GPU (`mixed`) decoders, so large images do not reallocate
    decoder_width_hint: int = num(5980, NONNEG)  # hardware decoder: sized for ImageNet's largest image
    decoder_height_hint: int = num(6430, NONNEG)
    host_padding_mb: int = num(16, NONNEG)  # pinned host: 2 buffers per decoder thread (dali_pinned_estimate)
    device_padding_mb: int = num(64, NONNEG)  # GPU memory: 1 buffer per decoder thread
    mean: list[float] = num(None, UNIT, lambda: [0.485, 0.456, 0.406])
    std: list[float] = num(None, above(0), lambda: [0.229, 0.224, 0.225])
    synthetic_size: int = num(1024, COUNT)  # images per split for the synthetic backend
    val_batch: int = num(0, NONNEG)  # per-rank validation batch; 0: the per-rank unlabeled batch (B * mu)
    check_images: bool = True  # decode every val and labeled image before the first step
    # Unlabeled images that may fail to decode in training before the run stops: each is dropped
    # (tools/train.py --drop-images), the run goes on from the checkpoint its stop saved, the event
    # logged; at any number of ranks (every rank stops at the same step); labeled and val images always stop.
    max_bad_images: int = num(0, NONNEG)

    def val_resize_px(self) -> int:
        """The validation resize in pixels: val_resize, or crop_size x 256 / 224 when it is 0."""
        return self.val_resize or int(round(self.crop_size * 256 / 224))

    def strong_crops(self) -> list[tuple[int, float, float]]:
        """(size, min scale, max scale) of each strong view, in view order."""
        if not self.strong_sizes:
            return [(self.crop_size, self.min_scale, self.max_scale)] * self.num_strong
        return list(zip(self.strong_sizes, self.strong_min_scales, self.strong_max_scales))


@dataclass
class ModelConfig:
    # a torchvision ResNet name, resnet10 (one block per stage), or a Wide ResNet of the Table 1
    # recipes: wrn_28_2, wrn_28_8, wrn_37_2 (simmatch/models/wrn.py)
    arch: str = "resnet50"
    small_input: bool = False  # 3x3 stride-1 stem and no max-pool, for images of 32 px or less
    proj_dim: int = num(128, COUNT)  # output of the projection head
    proj_hidden: int = num(0, NONNEG)  # hidden width of the projection head; 0: the trunk's feature width
    proj_bn: bool = False  # BatchNorm1d in the head's hidden layer (ISD: yes; SimMatch: no)
    ema_momentum: float = num(0.999, UNIT)
    # eman: EMA of parameters and BN buffers, eval mode. ema_shuffle_bn: EMA of parameters only,
    # train mode (BN on batch statistics) with shuffle-BN across ranks (SimMatch's published runs,
    # MoCo, ISD). Only a teacher that makes targets runs this way; FixMatch's and the supervised
    # baseline's EMA is only evaluated and always eman (their cards, simmatch/methods/).
    teacher: Literal["eman", "ema_shuffle_bn"] = "eman"
    norm_feat: bool = False  # LayerNorm on the pooled trunk feature, before classifier and head (SimMatchV2)
    init_from: str = ""  # run directory or checkpoint whose trunk initialises the student


@dataclass
class MethodConfig:
    """`method.name` picks the method; its own keys are `method.<name>.*`, the section its card
    declares (simmatch/methods/card.py), held in `sections` while the config is loaded and then
    only the chosen one, `params`. `sources` says where each section was last set (a key of
    another method than the chosen one is refused when the command line gives it)."""

    name: str = "simmatch"
    sections: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def params(self) -> Any:
        """The chosen method's section (its card's dataclass; its defaults if no file set it)."""
        if self.name not in self.sections:
            self.sections[self.name] = card_of(self.name).defaults()
        return self.sections[self.name]


@dataclass
class OptimConfig:
    # sgd: SGD with momentum (Nesterov), L2 weight decay in the gradient; adam: TensorFlow's Adam
    # (beta1 0.9, beta2 0.999, epsilon 1e-8 in its form) and decoupled decay of the weights after
    # each step, w <- w (1 - lr x weight_decay) (ReMixMatch's code); biases and BN never decay
    name: Literal["sgd", "adam"] = "sgd"
    lr: float = num(0.03, above(0))
    base_batch: int = num(64, COUNT)  # lr is given for this global labeled batch and scaled linearly
    momentum: float = num(0.9, Range(0.0, 1.0, hi_open=True))
    nesterov: bool = True
    weight_decay: float = num(1e-4, NONNEG)
    decay_bn_bias: bool = False  # True restores the official decay of BN and biases
    warmup_epochs: float = num(5.0, NONNEG)
    # cosine: lr x (1 + cos(pi k / K)) / 2 after the warm-up; fixmatch: lr x cos(7 pi k / 16 K)
    # (FixMatch's and USB's decay, which ends at 20 % of lr, not zero)
    # constant: lr throughout (ReMixMatch's Adam, after the warm-up if any)
    schedule: Literal["cosine", "fixmatch", "constant"] = "cosine"
    # iteration: the schedule's value at every step; epoch: after the warm-up (always per iteration, as the
    # authors' warmup_learning_rate), the value at the epoch's first step held for the whole epoch (the
    # authors' adjust_learning_rate, called once per epoch; their lr sum is larger by about 1 / epochs)
    lr_step: Literal["iteration", "epoch"] = "iteration"
    epochs: float = num(400.0, above(0))
    iters: int = num(0, NONNEG)  # >0 overrides epochs: total optimizer steps (per_gpu: of the reference batch)
    impl: Literal["foreach", "fused", "plain"] = "foreach"


@dataclass
class TrainConfig:
    # How the batch follows the world size. fixed_global: `batch_size` images over all ranks
    # (the per-rank batch shrinks as ranks are added). per_gpu: `batch_per_gpu` per rank, the
    # global batch grows with the ranks and every per-step quantity (lr, teacher momentum, DA
    # length, step counts and intervals) is converted from the reference global labeled batch
    # optim.base_batch so that it stays the same in images seen (see config/derive.py).
    scale: Literal["fixed_global", "per_gpu"] = "fixed_global"
    batch_size: int = num(64, COUNT)  # global labeled batch, divided over the ranks (scale=fixed_global)
    batch_per_gpu: int = num(0, NONNEG)  # labeled images per rank (scale=per_gpu)
    mu: int = num(5, COUNT)  # unlabeled images per labeled image
    # Virtual ranks: this many ranks' run computed by the physical processes, each process running
    # virtual_world_size / processes of them in turn as micro-batches of one optimizer step (the
    # same data, BN batches, shuffle-BN and recipe as that many GPUs). 0: off (one rank per process).
    virtual_world_size: int = num(0, NONNEG)
    # Ranks whose BN statistics are pooled (SyncBatchNorm over groups of consecutive ranks);
    # 1: per-rank BN (the authors'); 0: the smallest group that reaches min_bn_images.
    bn_group_ranks: int = num(1, NONNEG)
    # Refuse a run whose BN groups see fewer images per forward than this (0: no check).
    min_bn_images: int = num(0, NONNEG)
    # The epoch's last incomplete global batch: pad (repeat items cyclically, every image every
    # epoch: steps = ceil) or drop (the authors' drop_last: steps = floor(N / global batch)).
    partial_batch: Literal["pad", "drop"] = "pad"
    # auto: bf16 on GPU, none on CPU; fp16: with a GradScaler (SimMatchV2's --fp16); fp32 (= none): no
    # autocast (SimMatch's authors)
    amp: Literal["auto", "bf16", "fp16", "fp32", "none"] = "auto"
    channels_last: bool = False
    compile: bool = False
    seed: int = num(0, NONNEG)
    # Intervals in steps (scale=per_gpu: steps of the reference batch optim.base_batch)
    log_every: int = num(50, COUNT)
    ckpt_every: int = num(1000, COUNT)
    keep_ckpts: int = num(3, COUNT)
    async_ckpt: bool = True  # write checkpoints in a background thread after a host copy
    eval_every: int = num(0, NONNEG)  # 0: only at the end
    # whose validation top-1 (k-NN top-1 without a classifier) decides checkpoints/best.pt: the EMA
    # teacher's, or the student's (what the SimMatch authors report)
    best_by: Literal["teacher", "student"] = "teacher"
    knn_k: int = num(20, COUNT)  # k-NN evaluation (methods without a trained classifier, tools/eval.py --knn)
    knn_temperature: float = num(0.07, above(0))
    max_nonfinite_steps: int = num(3, NONNEG)  # stop when the loss is NaN/inf for more consecutive steps
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
    # Where a recipe's values come from (dotted key -> the paper, section or config that gives it),
    # shown by --print-config; a key set again later (a file without a source for it, the command
    # line) is shown with that file or "command line" instead
    sources: dict[str, str] = field(default_factory=dict)


def _collect_ranges() -> dict[str, Range]:
    """Dotted key -> valid range of every numeric field, read off the fields above."""
    out: dict[str, Range] = {}
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        cls = hints[section.name]
        if dataclasses.is_dataclass(cls):
            out.update({f"{section.name}.{f.name}": f.metadata["range"]
                        for f in dataclasses.fields(cls) if "range" in f.metadata})
    return out


RANGES: dict[str, Range] = _collect_ranges()
