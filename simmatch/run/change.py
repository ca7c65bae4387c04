"""What a changed config means for a run directory that already has checkpoints.

A run directory belongs to one experiment: resuming it with a config that trains differently
(another seed, learning rate, method, data split ...) would mix two experiments in one set of
checkpoints and metrics without anyone noticing. Keys are sorted into three kinds:

- neutral: how the run is observed or where files and data live (log and eval intervals,
  trackers, loader threads); a change is accepted with a note;
- schedule: the length of training (`optim.epochs`, `optim.iters`); accepted only with
  `--allow-config-change` (a longer schedule continues the run; the cosine decay is re-spread
  over the new length from the current iteration on);
- everything else changes what is trained: refused, the way out is a new `train.run_dir`.
"""
from __future__ import annotations

from simmatch.errors import ConfigError

ALLOW_FLAG = "--allow-config-change"

NEUTRAL = frozenset({
    "name", "train.run_dir", "train.output_root", "train.log_every", "train.eval_every",
    "train.ckpt_every", "train.keep_ckpts", "train.async_ckpt", "train.tensorboard", "train.wandb",
    "train.wandb_project", "train.knn_k", "train.knn_temperature", "train.compile",
    "train.best_by",  # which evaluation keeps best.pt: its record says which
    "data.root", "data.format", "data.shards", "data.max_open_shards",  # where the images are read
    "data.num_threads", "data.prefetch", "data.hw_decoder_load", "data.val_batch",
    "data.num_train_images",  # only the printed recipe uses it
    "data.max_bad_images",  # what is dropped is recorded in splits/dropped.txt, which the resume reads
    "model.init_from",  # a resumed run takes its weights from its own checkpoint
    "train.virtual_world_size",  # how many processes compute the ranks: another value is an elastic resume
})
SCHEDULE = frozenset({"optim.epochs", "optim.iters"})


def differences(saved: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    diffs = []
    for key in sorted(set(saved) | set(new)):
        a, b = saved.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}")
    return diffs


def _show(keys: list[str], saved: dict, new: dict, limit: int = 6) -> str:
    def value(d: dict, key: str):
        for part in key.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    shown = [f"{k} ({value(saved, k)!r} -> {value(new, k)!r})" for k in keys[:limit]]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(shown) + more


def judge(saved: dict, new: dict, run_dir: str, allow_change: bool, source: str = "") -> list[str]:
    """Raise ConfigError when `new` may not resume the run saved with `saved`; otherwise return
    the differing keys that are accepted (for a note). `source`: where `saved` was read (the run's
    config.yaml by default; the config inside its newest checkpoint when that file is gone)."""
    diffs = differences(saved, new)
    training = [k for k in diffs if k not in NEUTRAL and k not in SCHEDULE]
    schedule = [k for k in diffs if k in SCHEDULE]
    if training:
        saved_at = source or f"the saved config, {run_dir}/config.yaml"
        raise ConfigError(
            f"{run_dir} holds a run trained with another config: {_show(training, saved, new)} "
            f"would change what is trained; use a new train.run_dir (or {saved_at}) to keep both "
            f"experiments apart")
    if schedule and not allow_change:
        raise ConfigError(
            f"{run_dir} holds a run with another schedule: {_show(schedule, saved, new)}; pass "
            f"{ALLOW_FLAG} to continue it with the new length, or use a new train.run_dir")
    return diffs


def judge_checkpoint(embedded: dict | None, new: dict, path: str) -> None:
    """Raise ConfigError when the checkpoint at `path` was written by a run that trained
    differently from `new` (the run directory's config): a checkpoint copied in from another run
    would otherwise be resumed silently. Observation keys and the schedule length may differ (a
    run continued with --allow-config-change keeps its older checkpoints)."""
    if not embedded:
        return  # written before checkpoints carried their config
    from simmatch.config import with_defaults

    training = [k for k in differences(with_defaults(embedded), new) if k not in NEUTRAL and k not in SCHEDULE]
    if training:
        raise ConfigError(
            f"{path} was written by another run or with another config: "
            f"{_show(training, with_defaults(embedded), new)} differ from this run's config; resume with the "
            f"config it was written with, or move it out of the run directory")
