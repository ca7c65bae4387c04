"""The derived recipe of a config at a world size, shown before anything trains.

`tools/train.py --print-config` and `tools/submit.py --dry-run` print it: batches, BN groups,
teacher, momentum, lr, steps, splits and their sizes. What the method uses (its teacher, DA,
bank, streams, its own lines) comes from its card (simmatch/methods/card.py): a FixMatch recipe shows the
teacher it trains with and no DA queue. Image counts come from the data tree
when it is there, otherwise from the split lists and `data.num_train_images` (so the recipe
of an ImageNet run can be read on a machine without ImageNet). With virtual ranks
(train.virtual_world_size) it is the recipe of that many ranks, whatever the processes: a
"ranks" line says how many processes run them, as how many micro-batches each. No torch
import here: the submitting machine stays light.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from simmatch.config import Config, Derived, derive, derive_scale, intervals_text
from simmatch.data.splits import list_path, load_splits, read_list
from simmatch.methods.card import card_of, size_text
from simmatch.run.world_sizes import processes_text, running_text
from simmatch.shards.formats import data_format


@dataclass
class SplitSizes:
    num_labeled: int | None
    num_unlabeled: int | None
    labeled: str  # where the labeled set comes from
    unlabeled: str
    counted_from: str  # the data tree, or the lists and data.num_train_images


def _list_size(name: str) -> int:
    return len(dict.fromkeys(read_list(name)))  # duplicates count once, as when resolved


def split_sizes(cfg: Config) -> SplitSizes:
    """Labeled and unlabeled image counts: scanned when the tree exists, else declared."""
    d = cfg.data
    labeled = (f"{d.labeled_list} ({list_path(d.labeled_list)})" if d.labeled_list else
               f"seeded draw: {d.labeled_percent:g}%" if d.labeled_percent > 0 else
               f"seeded draw: {d.labeled_per_class} per class")
    if d.labeled_list == "" and d.labeled_percent <= 0 and d.labeled_per_class <= 0:
        labeled = "none configured"
    if d.backend == "synthetic":
        n = d.synthetic_size
        return SplitSizes(n, n, "synthetic", "synthetic", f"data.synthetic_size={n}")
    fmt = data_format(d)
    pool = f"{d.unlabeled_list}" if d.unlabeled_list else fmt.pool_text
    unlabeled = (f"complement of the labeled list in {pool}" if d.unlabeled == "complement" else pool)
    tree = fmt.listing()
    if fmt.path is not None and tree.exists():
        s = load_splits(d, need_val=False)
        return SplitSizes(len(s.labeled_files), len(s.unlabeled_files), labeled, unlabeled, fmt.listing_name())
    declared = fmt.declared_sizes()
    total = d.num_train_images or (declared[0] if declared else None)
    where = (f"data.num_train_images={total} (data tree {tree} absent)" if d.num_train_images else
             f"{total:,} training images, as published ({tree} absent)" if total else
             f"unknown: data tree {tree} absent and data.num_train_images not set")
    if d.labeled_list:
        n_lab: int | None = _list_size(d.labeled_list)
    elif d.labeled_per_class > 0 and d.labeled_percent <= 0:
        n_lab = d.labeled_per_class * d.num_classes
    elif d.labeled_percent > 0 and total:
        n_lab = round(total * d.labeled_percent / 100.0)  # per class rounding may differ slightly
        labeled += " (size estimated from data.num_train_images)"
    else:
        n_lab = None
    n_pool = _list_size(d.unlabeled_list) if d.unlabeled_list else \
        declared[1] if declared and not d.num_train_images else total
    if n_pool is not None and d.unlabeled == "complement":
        n_pool = n_pool - n_lab if n_lab is not None else None
    return SplitSizes(n_lab, n_pool, labeled, unlabeled, where)


def recipe(cfg: Config, world_size: int) -> dict:
    """The recipe of `world_size` processes as one flat dict (the JSON line); steps are None when
    sizes are unknown. "world_size" is the run's ranks (train.virtual_world_size when set), so
    that a virtual-rank run's recipe reads as that of as many GPUs; the processes are
    world_size / micro_batches. The method adds its own entries (its card's `recipe`)."""
    sizes = split_sizes(cfg)
    if sizes.num_labeled is not None and sizes.num_unlabeled is not None:
        d: Derived | None = derive(cfg, world_size, sizes.num_labeled, sizes.num_unlabeled)
        s = d
    else:
        d, s = None, derive_scale(cfg, world_size)
    card, params = card_of(cfg.method.name), cfg.method.params
    values = s.method_values
    memory = card.memory(cfg, params, values, sizes.num_labeled or 0) if card.memory is not None else {}
    return {
        "config": cfg.name, "method": cfg.method.name, "world_size": s.world_size,
        "virtual_world_size": s.virtual_world_size, "micro_batches": s.micro_batches,
        "scale": cfg.train.scale,
        "labeled_per_gpu": s.batch_per_rank, "unlabeled_per_gpu": s.unlabeled_per_rank,
        "global_labeled": s.global_batch, "global_unlabeled": s.global_unlabeled,
        "bn_group_ranks": s.bn_group_ranks, "bn_group_images": s.bn_group_images,
        "min_bn_images": cfg.train.min_bn_images,
        "teacher": card.teacher(cfg), "ema_momentum": s.ema_momentum, "lr": s.lr,
        "partial_batch": cfg.train.partial_batch,
        "steps_per_epoch": d.steps_per_epoch if d else None,
        "epochs": cfg.optim.epochs if cfg.optim.iters <= 0 else None,
        "total_iters": d.total_iters if d else None,
        "warmup_iters": d.warmup_iters if d else None,
        "log_every": s.log_every, "ckpt_every": s.ckpt_every, "eval_every": s.eval_every,
        "intervals_clamped": list(d.interval_notes) if d else [],
        "num_labeled": sizes.num_labeled, "num_unlabeled": sizes.num_unlabeled,
        "labeled_set": sizes.labeled, "unlabeled_set": sizes.unlabeled,
        "sizes_from": sizes.counted_from,
        "crop_size": cfg.data.crop_size, "val_resize": cfg.data.val_resize_px(),  # pixels
        # the strong views of each unlabeled image: [size px, min scale, max scale] each
        "strong_views": [list(view) for view in cfg.data.strong_crops()] if card.needs_unlabeled else None,
        # the method's own section and the values of its scaled keys at this global batch
        "method_params": dataclasses.asdict(params), "method_values": dict(values),
        # the banks and queues every rank allocates, in bytes by name (the labeled bank needs the set's size)
        "bank_bytes": memory,
        **method_part(cfg, values, sizes.num_labeled)[1],  # the method's own entries (its card's recipe)
        "sources": sourced_values(cfg),
    }


def sourced_values(cfg: Config) -> dict[str, dict]:
    """Each key of `cfg.sources` that this run uses, with its value and where it comes from (a
    key of another method than the chosen one is left out)."""
    out = {}
    for key, origin in cfg.sources.items():
        parts = key.split(".")
        if parts[0] == "method" and len(parts) == 3:
            if parts[1] != cfg.method.name:
                continue
            value = getattr(cfg.method.params, parts[2])
        else:
            value = cfg
            for part in parts:
                value = getattr(value, part)
        out[key] = {"value": value, "from": origin}
    return out


def method_part(cfg: Config, values: dict, num_labeled: int | None) -> tuple[list[str], dict]:
    """The method's own recipe lines and JSON entries (its card's `recipe`), from its scaled values
    and the labeled set's size (`num_labeled` among them; None where unknown)."""
    card = card_of(cfg.method.name)
    return card.recipe(cfg, cfg.method.params, {**values, "num_labeled": num_labeled}) \
        if card.recipe is not None else ([], {})


def _n(value) -> str:
    return "unknown" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def _processes(r: dict) -> int:
    return r["world_size"] // r["micro_batches"]


def _rank_images(r: dict) -> str:
    """Images one rank draws per step, of the streams the method trains on."""
    card = card_of(r["method"])
    if not card.needs_labeled:
        return f"{r['unlabeled_per_gpu']} unlabeled"
    if not card.needs_unlabeled:
        return f"{r['labeled_per_gpu']} labeled"
    return f"{r['labeled_per_gpu']} + {r['unlabeled_per_gpu']}"


def _batch_text(r: dict, gpus: bool = True) -> str:
    """Per-rank and global batches of the streams the method trains on: per GPU (per process for a
    CPU config, `gpus` False) without virtual ranks; with them per rank, since a process then runs
    several ranks."""
    if r["virtual_world_size"]:
        unit, over = "rank", f"per step over {r['world_size']} virtual ranks on {processes_text(_processes(r))}"
    elif gpus:
        unit, over = "GPU", f"per step over {r['world_size']} GPU(s)"
    else:
        unit, over = "process", f"per step over {r['world_size']} process{'' if r['world_size'] == 1 else 'es'}"
    card = card_of(r["method"])
    if not card.needs_labeled:
        return (f"{r['unlabeled_per_gpu']} unlabeled per {unit}; {r['global_unlabeled']} {over} "
                f"(no labels in training)")
    if not card.needs_unlabeled:
        return f"{r['labeled_per_gpu']} labeled per {unit}; {r['global_labeled']} {over}"
    return (f"{r['labeled_per_gpu']} labeled + {r['unlabeled_per_gpu']} unlabeled per {unit}; "
            f"{r['global_labeled']} + {r['global_unlabeled']} {over}")


def _ranks_text(r: dict) -> str:
    """Processes, virtual ranks and micro-batches: what computes the run's ranks."""
    procs = _processes(r)
    if not r["virtual_world_size"]:
        return f"{procs} process(es), one rank each (train.virtual_world_size=0)"
    return (f"{running_text(r['world_size'], procs)}: {r['micro_batches']} micro-batches of "
            f"{_rank_images(r)} images per process per step (train.virtual_world_size={r['virtual_world_size']})")


def _strong_text(d) -> str:
    """The small-image strong views' photometric part, as the pipeline makes it."""
    if not d.randaug_n:
        return "translated" + (" and flipped" if d.flip else "") + " only" + (", then Cutout" if d.cutout else "")
    return f"FixMatch's RandAugment, {d.randaug_n} random ops of 14" + (" then Cutout" if d.cutout else "")


def recipe_lines(cfg: Config, world_size: int) -> list[str]:
    """Human-readable lines, then the recipe as one JSON object (the last line); `world_size`
    is the processes, as in `recipe`."""
    r = recipe(cfg, world_size)
    method_lines = method_part(cfg, r["method_values"], r["num_labeled"])[0]
    o, card = cfg.optim, card_of(cfg.method.name)
    k = r["global_labeled"] / o.base_batch if cfg.train.scale == "per_gpu" else 1.0
    pool = r["num_unlabeled"] if card.needs_unlabeled else r["num_labeled"]
    per_step = r["global_unlabeled"] if card.needs_unlabeled else r["global_labeled"]
    rounding = "floor" if r["partial_batch"] == "drop" else "ceil"
    length = (f"{_n(r['total_iters'])} iterations ({o.epochs:g} epochs)" if o.iters <= 0 else
              f"{_n(r['total_iters'])} iterations (optim.iters={o.iters})")
    lines = [
        f"recipe of {r['config'] or 'run'} ({r['method']}) "
        + (f"on {running_text(r['world_size'], _processes(r))}" if r["virtual_world_size"]
           else f"at world size {r['world_size']}") + f", train.scale={r['scale']}",
        f"  ranks        {_ranks_text(r)}",
        f"  batch        {_batch_text(r, gpus=cfg.data.device != 'cpu')}",
        f"  BN groups    {r['bn_group_ranks']} rank(s) = {r['bn_group_images']} images per BN batch"
        f" (train.min_bn_images={r['min_bn_images']})",
        f"  teacher      {r['teacher']}, EMA momentum {r['ema_momentum']:.6g}"
        + (f" ({cfg.model.ema_momentum} ** {k:g})" if k != 1.0 else ""),
        f"  lr           {r['lr']:.6g} ({o.lr:g} x {r['global_labeled']} / {o.base_batch}), "
        f"warm-up {o.warmup_epochs:g} epochs = {_n(r['warmup_iters'])} iterations, then "
        + {"fixmatch": "cos(7 pi k / 16 K) (optim.schedule=fixmatch)",
           "constant": "constant (optim.schedule=constant)"}.get(o.schedule, "cosine")
        + (", held through each epoch at its first step's value (optim.lr_step=epoch)" if o.lr_step == "epoch"
           else ", set every iteration (optim.lr_step=iteration)"),
        "  precision    " + {"auto": "bf16 autocast on CUDA, fp32 on the CPU", "bf16": "bf16 autocast",
                             "fp16": "fp16 autocast with a GradScaler", "fp32": "fp32, no autocast",
                             "none": "fp32, no autocast"}[cfg.train.amp] + f" (train.amp={cfg.train.amp})",
        "  optimizer    " + (f"Adam (TensorFlow's form: beta 0.9 / 0.999, eps 1e-8), then the weights decayed "
                             f"w <- w (1 - lr x {o.weight_decay:g}) (optim.name=adam)" if o.name == "adam" else
                             f"SGD, momentum {o.momentum:g}" + (", Nesterov" if o.nesterov else "")
                             + f", weight decay {o.weight_decay:g} (optim.name=sgd)"),
        f"  epoch        {_n(r['steps_per_epoch'])} steps ({rounding}({_n(pool)} / {per_step}), "
        f"train.partial_batch={r['partial_batch']})",
        f"  total        {length}",
    ]
    d = cfg.data
    if d.augment == "translate":
        pad = int(round(d.translate * d.crop_size))
        lines.append(f"  images       {r['crop_size']} px, translated by up to {pad} px (reflect padding, "
                     f"data.translate={d.translate:g})" + (", flipped" if d.flip else ", not flipped")
                     + (f"; {d.num_strong} strong view(s): " + _strong_text(d) if card.needs_unlabeled else "")
                     + "; validation: the images as they are")
    else:
        lines.append(f"  images       crops of {r['crop_size']} px; validation: shorter side resized to "
                     f"{r['val_resize']} px, centre crop {r['crop_size']} px")
    params = ", ".join(f"{key} {value}" for key, value in r["method_params"].items())
    lines.append(f"  method       {r['method']}: {params or 'no keys of its own'} (method.{r['method']}.*)")
    if cfg.data.strong_sizes and card.needs_unlabeled:
        lines.append(f"  multi-crop   {len(r['strong_views'])} strong views of "
                     + " / ".join(str(size) for size, _, _ in r["strong_views"]) + " px, scales "
                     + " / ".join(f"{lo:g}-{hi:g}" for _, lo, hi in r["strong_views"]))
    lines += method_lines
    if r["bank_bytes"]:
        lines.append(f"  memory       banks {size_text(sum(r['bank_bytes'].values()))} per rank ("
                     + ", ".join(f"{name} {size_text(n)}" for name, n in r["bank_bytes"].items()) + ")")
    if r["sources"]:
        lines.append("  sources      where the recipe's values come from:")
        lines += [f"               {key} = {entry['value']}: {entry['from']}" for key, entry in r["sources"].items()]
    lines += [f"  intervals    {intervals_text(r['log_every'], r['ckpt_every'], r['eval_every'], r['total_iters'])}"]
    lines += [f"               {note}" for note in r["intervals_clamped"]]
    lines += [
        f"  labeled      {_n(r['num_labeled'])} images: {r['labeled_set']}",
        f"  unlabeled    {_n(r['num_unlabeled'])} images: {r['unlabeled_set']}",
        f"  sizes from   {r['sizes_from']}",
        json.dumps(r, sort_keys=False),
    ]
    return lines
