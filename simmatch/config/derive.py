"""Everything that follows from a config and a world size (and, for step counts, the data).

Computed once, here: batches, BN groups, the linear lr rule, teacher momentum, intervals, steps
per epoch, total and warm-up iterations, and the method's own quantities that follow the global
batch (its card's `Scaled` keys, `method_values`). The method's facts (which streams it draws,
which forwards normalise with batch statistics) come from its card (simmatch/methods/card.py).
Methods and the engine take these values from `Derived`, never from the raw config. No torch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from simmatch.config.schema import Config
from simmatch.errors import ConfigError
from simmatch.methods.card import card_of


@dataclass
class Scale:
    """Batches and every per-step quantity at a world size (no data needed)."""

    world_size: int  # ranks of the run: the virtual world size when there is one, else the processes
    batch_per_rank: int  # labeled images per rank per step
    unlabeled_per_rank: int
    global_batch: int  # labeled images per step over all ranks
    global_unlabeled: int
    step_scale: float  # images seen per step relative to the reference batch (per_gpu), else 1
    lr: float  # linear rule: optim.lr x global labeled batch / optim.base_batch
    ema_momentum: float  # model.ema_momentum ** step_scale
    bn_group_ranks: int
    bn_group_images: int  # images in one BN batch (the smaller of student and teacher forward)
    log_every: int
    ckpt_every: int
    eval_every: int
    physical_world_size: int = 0  # processes (GPUs); world_size / micro_batches
    virtual_world_size: int = 0  # train.virtual_world_size (0: off)
    micro_batches: int = 1  # ranks each process runs in turn per optimizer step
    # the method's scaled keys at this global batch (its card's `Scaled`): key -> value
    method_values: dict = dataclasses.field(default_factory=dict)

    def ranks_of(self, process: int) -> range:
        """The run's ranks that process `process` computes: its own, or its virtual ranks (consecutive,
        micro_batches of them); the engine hands them to the data layer."""
        processes = self.physical_world_size or self.world_size
        per = self.world_size // processes
        return range(process * per, (process + 1) * per)


@dataclass
class Derived(Scale):
    """Values that follow from the config, the world size and the data; computed in one place."""

    steps_per_epoch: int = 1  # one epoch = one pass over the unlabeled set
    total_iters: int = 1
    warmup_iters: int = 0
    num_labeled: int = 0  # K, the bank size
    num_unlabeled: int = 0
    interval_notes: tuple[str, ...] = ()  # intervals longer than the run, clamped to it (one line each)


def _per_step(value: int, step_scale: float) -> int:
    """A count of steps at the reference batch, in steps of this batch (nearest, >= 1)."""
    return max(1, round(value / step_scale))


def steps_per_epoch(num_items: int, global_batch: int, partial_batch: str) -> int:
    """Global batches in one pass over `num_items`: ceil (pad) or floor (drop), at least 1."""
    per = max(1, global_batch)
    steps = num_items // per if partial_batch == "drop" else -(-num_items // per)
    return max(1, steps)


def run_world_size(cfg: Config, processes: int) -> int:
    """The ranks whose run `processes` processes compute: train.virtual_world_size when set
    (a multiple of the processes, refused otherwise), else the processes themselves."""
    if processes < 1:
        raise ConfigError(f"world size {processes} must be at least 1")
    v = cfg.train.virtual_world_size
    if v == 0:
        return processes
    if v < processes:
        raise ConfigError(f"train.virtual_world_size={v} is fewer than the {processes} processes: "
                          f"each process runs at least one rank")
    if v % processes:
        raise ConfigError(f"train.virtual_world_size={v} is not a multiple of the {processes} "
                          f"process(es): each process runs the same number of virtual ranks")
    return v


def derive_scale(cfg: Config, world_size: int) -> Scale:
    """The recipe of `world_size` processes: that of train.virtual_world_size ranks when it is
    set (each process then runs micro_batches of them in turn), else of `world_size` ranks."""
    ranks = run_world_size(cfg, world_size)
    s = scale_at(cfg, ranks)
    s.physical_world_size, s.micro_batches = world_size, ranks // world_size
    s.virtual_world_size = cfg.train.virtual_world_size
    if s.bn_group_ranks % s.micro_batches and s.micro_batches % s.bn_group_ranks:
        raise ConfigError(f"BN groups of {s.bn_group_ranks} ranks and {s.micro_batches} virtual ranks per "
                          f"process: one must divide the other (train.bn_group_ranks, train.virtual_world_size)")
    return s


def scale_at(cfg: Config, world_size: int) -> Scale:
    """Batches, lr, teacher momentum, DA length, intervals and BN groups of a run of
    `world_size` ranks, however many processes compute them.

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
    card = card_of(cfg.method.name)
    rank_images = card.bn_batch(per_rank, per_rank * t.mu, cfg.data.num_strong, cfg.model.teacher)
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
        bn_group_ranks=group, bn_group_images=bn_images,
        log_every=_per_step(t.log_every, k), ckpt_every=_per_step(t.ckpt_every, k),
        eval_every=_per_step(t.eval_every, k) if t.eval_every > 0 else 0,
        physical_world_size=world_size,
        method_values={q.key: q.at(getattr(cfg.method.params, q.key), k, glob * t.mu)
                       for q in card.scaled if q.rule != "epochs"},
    )


def derive(cfg: Config, world_size: int, num_labeled: int, num_unlabeled: int) -> Derived:
    """Compute everything that depends on the config together with the run's environment
    (`world_size`: processes; see `derive_scale`)."""
    return with_steps(cfg, derive_scale(cfg, world_size), num_labeled, num_unlabeled)


def derive_at(cfg: Config, ranks: int, num_labeled: int, num_unlabeled: int) -> Derived:
    """`derive` for a run of `ranks` ranks however many processes computed them (`scale_at`):
    what a checkpoint's run was, for an elastic resume."""
    return with_steps(cfg, scale_at(cfg, ranks), num_labeled, num_unlabeled)


def with_steps(cfg: Config, s: Scale, num_labeled: int, num_unlabeled: int) -> Derived:
    """The scale `s` (derived once for a run) with the step counts of the data."""
    card = card_of(cfg.method.name)
    uses_unlabeled = card.needs_unlabeled
    denom = s.global_unlabeled if uses_unlabeled else s.global_batch
    pool = num_unlabeled if uses_unlabeled else num_labeled
    steps = steps_per_epoch(pool, denom, cfg.train.partial_batch)
    if cfg.optim.iters > 0:
        total = _per_step(cfg.optim.iters, s.step_scale)
    else:
        total = max(1, round(cfg.optim.epochs * steps))
    s = dataclasses.replace(s)
    notes = []
    for key, what in (("log_every", "logged at the end only"), ("ckpt_every", "a checkpoint at the end only"),
                      ("eval_every", "evaluated at the end only")):
        value = getattr(s, key)
        if value > total:
            given = getattr(cfg.train, key)
            scaled = f" ({given:,} reference steps)" if value != given else ""
            notes.append(f"train.{key}={value:,} iterations{scaled} is longer than this run's {total:,}: "
                         f"clamped to {total:,} ({what})")
            setattr(s, key, total)
    values = dict(s.method_values)
    values.update({q.key: int(getattr(cfg.method.params, q.key) * steps) for q in card.scaled if q.rule == "epochs"})
    fields = {**dataclasses.asdict(s), "method_values": values}
    return Derived(
        **fields,
        interval_notes=tuple(notes),
        steps_per_epoch=steps,
        total_iters=total,
        warmup_iters=round(cfg.optim.warmup_epochs * steps),
        num_labeled=num_labeled,
        num_unlabeled=num_unlabeled,
    )


def intervals_text(log_every: int, ckpt_every: int, eval_every: int, total_iters: int | None = None) -> str:
    """The effective intervals, in iterations of this run (train.*_every count steps of the
    reference batch optim.base_batch: at another global batch they are re-scaled, then clamped
    to the run's length)."""
    return (f"log every {log_every:,}, checkpoint every {ckpt_every:,} iterations, "
            + (f"eval every {eval_every:,}" if eval_every else "eval at the end")
            + (f" (of {total_iters:,})" if total_iters else ""))
