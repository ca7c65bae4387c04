"""Train in this process: the distributed environment comes from torchrun, SLURM or tools/train.py."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
import yaml

from simmatch import checkpoint as ckpt
from simmatch import distributed as dist
from simmatch.config import Config, load_config, save_config, to_dict
from simmatch.engine.trainer import Trainer, TrainResult
from simmatch.errors import UserError

log = logging.getLogger("simmatch")


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.train.run_dir) if cfg.train.run_dir else Path(cfg.train.output_root) / (cfg.name or "run")


def _config_differences(saved: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(new)):
        a, b = saved.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}")
    return diffs


def prepare_run_dir(cfg: Config) -> Path:
    """Create the run directory and save the resolved config there, never overwriting one."""
    run_dir = run_dir_of(cfg)
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        saved = run_dir / "config.yaml"
        if not saved.exists():
            save_config(cfg, saved)
        else:
            old = yaml.safe_load(saved.read_text()) or {}
            diffs = [d for d in _config_differences(old, to_dict(cfg)) if d != "train.run_dir"]
            if diffs:
                print(f"warning: {saved} differs from this run's config in {', '.join(diffs[:8])}; "
                      f"keeping the saved file", file=sys.stderr)
    dist.barrier()
    return run_dir


def pick_device() -> torch.device:
    """cuda:(LOCAL_RANK mod visible GPUs) where CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", dist.local_device_index())
    return torch.device("cpu")


def run(cfg_path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainResult:
    """Load the config, join the process group, train (resuming if possible), leave the group."""
    cfg = load_config(cfg_path, list(overrides))
    dist.init()
    try:
        device = pick_device()
        if cfg.model.init_from and not ckpt.list_checkpoints(run_dir_of(cfg) / "checkpoints"):
            from simmatch.export import check_init_source

            check_init_source(cfg)  # before the run directory is created or written
        run_dir = prepare_run_dir(cfg)
        trainer = Trainer(cfg, run_dir, device)
        result = trainer.fit()
        if dist.is_main() and result.status == "finished" and result.metrics:
            m = result.metrics
            kind = "" if "student_top1" in m else "knn_"
            label = "validation top-1" if not kind else "validation k-NN top-1"
            print(f"{label}: student {m.get(f'student_{kind}top1', float('nan')):.2f}%  "
                  f"teacher {m.get(f'teacher_{kind}top1', float('nan')):.2f}%  ({run_dir})", flush=True)
        return result
    finally:
        dist.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train one process of a (possibly distributed) run.")
    parser.add_argument("--cfg", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    try:
        result = run(args.cfg, args.overrides)
    except UserError as exc:
        if dist.rank() == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0 if result.status in ("finished", "interrupted") else 1


if __name__ == "__main__":
    sys.exit(main())
