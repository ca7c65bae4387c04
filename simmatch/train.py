"""Train in this process: the distributed environment comes from torchrun, SLURM or tools/train.py."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
import yaml

from simmatch import checkpoint as ckpt
from simmatch import distributed as dist
from simmatch.config import Config, load_config, save_config, to_dict
from simmatch.config_change import ALLOW_FLAG, differences, judge
from simmatch.engine.metrics import format_eta
from simmatch.engine.tracking import check_available as check_trackers
from simmatch.engine.trainer import Trainer, TrainResult
from simmatch.errors import UserError

log = logging.getLogger("simmatch")


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.train.run_dir) if cfg.train.run_dir else Path(cfg.train.output_root) / (cfg.name or "run")


def _with_defaults(saved: dict, defaults: dict) -> dict:
    """A saved config with keys added to the project since it was written set to their defaults."""
    out = dict(defaults)
    for key, value in saved.items():
        out[key] = _with_defaults(value, defaults[key]) if isinstance(value, dict) and \
            isinstance(defaults.get(key), dict) else value
    return out


def prepare_run_dir(cfg: Config, allow_config_change: bool = False) -> Path:
    """Create the run directory and save the resolved config there.

    A run directory with checkpoints is resumed only with a config that trains the same way
    (simmatch/config_change.py): otherwise one error line names the differing keys. Accepted
    changes (log intervals, data location, a longer schedule with --allow-config-change)
    rewrite the saved config so that it describes what is trained from now on.
    """
    run_dir = run_dir_of(cfg)
    saved = run_dir / "config.yaml"
    resuming = bool(ckpt.list_checkpoints(run_dir / "checkpoints"))
    changed: list[str] = []
    if saved.exists():
        old = _with_defaults(yaml.safe_load(saved.read_text()) or {}, to_dict(Config()))
        if resuming:  # every rank judges, so that a refusal stops them all
            changed = judge(old, to_dict(cfg), str(run_dir), allow_config_change)
        else:
            changed = differences(old, to_dict(cfg))
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        if not saved.exists() or changed:
            save_config(cfg, saved)
        shown = [k for k in changed if k not in ("train.run_dir", "name")]
        if shown:
            print(f"note: {saved} updated ({', '.join(shown[:8])} changed"
                  f"{'' if resuming else '; no checkpoint yet, so the run starts afresh'})",
                  file=sys.stderr, flush=True)
    dist.barrier()
    return run_dir


def pick_device() -> torch.device:
    """cuda:(LOCAL_RANK mod visible GPUs) where CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", dist.local_device_index())
    return torch.device("cpu")


def _report(result: TrainResult, run_dir: Path) -> None:
    """The line a user reads at the end: the accuracy, or that the run had already finished."""
    m = result.metrics
    kind = "" if "student_top1" in m or "teacher_top1" in m else "knn_"
    label = "validation top-1" if not kind else "validation k-NN top-1"
    scores = (f"{label}: student {m.get(f'student_{kind}top1', float('nan')):.2f}%  "
              f"teacher {m.get(f'teacher_{kind}top1', float('nan')):.2f}%")
    if result.status == "already_finished":
        print(f"{run_dir} is already finished (iteration {result.iteration}); its result: {scores} "
              f"(metrics.jsonl, checkpoints/); nothing trained. To train again use a new train.run_dir "
              f"(or {ALLOW_FLAG} with a longer optim.iters / optim.epochs to continue it)", flush=True)
    elif result.status == "finished" and m:
        print(f"{scores}  ({run_dir})", flush=True)


def run(cfg_path: str | None, overrides: list[str] | tuple[str, ...] = (),
        allow_config_change: bool = False) -> TrainResult:
    """Load the config, join the process group, train (resuming if possible), leave the group."""
    started = time.time()
    cfg = load_config(cfg_path, list(overrides))
    dist.init()
    try:
        device = pick_device()
        if cfg.model.init_from and not ckpt.list_checkpoints(run_dir_of(cfg) / "checkpoints"):
            from simmatch.export import check_init_source

            check_init_source(cfg)  # before the run directory is created or written
        check_trackers(cfg)  # an uninstalled tracker is refused before the run directory is written
        run_dir = prepare_run_dir(cfg, allow_config_change)
        trainer = Trainer(cfg, run_dir, device)
        result = trainer.fit()
        if dist.is_main():
            _report(result, run_dir)
            print(f"total time {format_eta(time.time() - started)} "
                  f"({result.iteration - result.start_iteration} iterations trained in this process)",
                  flush=True)
        return result
    finally:
        dist.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train one process of a (possibly distributed) run.")
    parser.add_argument("--cfg", required=True, help="YAML config file")
    parser.add_argument(ALLOW_FLAG, dest="allow_config_change", action="store_true",
                        help="resume a run directory whose saved config has another schedule length")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    try:
        result = run(args.cfg, args.overrides, args.allow_config_change)
    except UserError as exc:
        if dist.rank() == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0 if result.status in ("finished", "interrupted", "already_finished") else 1


if __name__ == "__main__":
    sys.exit(main())
