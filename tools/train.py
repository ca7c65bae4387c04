#!/usr/bin/env python
"""Train: `python tools/train.py --cfg yaml/digits.yaml [--nproc N] [key=value ...]`.

One process per GPU by default (N CPU processes with --nproc on a CPU machine); under
torchrun or SLURM (RANK/WORLD_SIZE already set) it trains in this process.
`--print-config [--world-size N]` prints the derived recipe (batches, BN groups, teacher,
momentum, lr, steps, splits) and exits without training or reading images; its last line is
one JSON object. With `train.virtual_world_size=V` the N processes compute the run of V ranks
(V / N of them per process, in turn, each optimizer step): the recipe is that of V GPUs.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from simmatch.errors import cli_errors  # noqa: E402


@cli_errors
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="YAML config, e.g. yaml/in1k_1pct.yaml")
    parser.add_argument("--nproc", type=int, default=0,
                        help="processes on this machine (default: one per GPU, or 1 without GPU)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="continue a run directory whose saved config has another schedule length "
                             "(optim.iters / optim.epochs); other training changes need a new train.run_dir")
    parser.add_argument("--print-config", action="store_true",
                        help="print the derived recipe at --world-size and exit (no training, no data needed)")
    parser.add_argument("--world-size", type=int, default=0,
                        help="processes of --print-config and --check (default: $WORLD_SIZE, --nproc, "
                             "or the GPUs here; --check without it skips the world-size checks); with "
                             "train.virtual_world_size=V they run V ranks between them")
    parser.add_argument("--check", action="store_true",
                        help="check config, data, images and run directory without training; "
                             "one line per check, exit 0 only when all pass")
    parser.add_argument("--drop-images", metavar="FILE",
                        help="go on without the unlabeled images listed in FILE (one path per line, as "
                             "RUN_DIR/splits/*.txt write them or as absolute paths under the training folder; "
                             "tools/check_data.py --write-bad FILE writes one): each one's place is taken by "
                             "the next image of the list; recorded in RUN_DIR/splits/dropped.txt and metrics.jsonl")
    parser.add_argument("--full", action="store_true",
                        help="with --check: decode every training image (all cores), not a sample of 500; "
                             "on shards also every shard's sha256")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.batch_size=32")
    args = parser.parse_intermixed_args()  # options before or after the overrides
    if args.print_config:
        return print_config(args)
    if args.drop_images:
        drop(args)
    if args.check:
        from simmatch.config import load_config
        from simmatch.launch.preflight import check_main
        from simmatch.run.rundir import run_dir_of

        cfg = load_config(args.cfg, args.overrides)
        return check_main(cfg, run_dir_of(cfg), args.world_size or args.nproc or None,
                          args.allow_config_change, full=args.full)
    flags = ["--allow-config-change"] if args.allow_config_change else []
    from simmatch.config import derive_scale, load_config

    cfg = load_config(args.cfg, args.overrides)  # a bad key or value fails here, before torch is imported
    from simmatch.shards.formats import require_data_dirs

    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # torchrun / SLURM already made the ranks
        from simmatch.train import main as train_main

        derive_scale(cfg, int(os.environ["WORLD_SIZE"]))  # e.g. virtual ranks the processes do not divide
        require_data_dirs(cfg.data)
        return train_main(["--cfg", args.cfg, *flags, *args.overrides])
    if args.nproc:
        derive_scale(cfg, args.nproc)  # refused in one line before torch is imported or a process starts
    require_data_dirs(cfg.data)  # so is a missing data tree (seconds sooner, and no process started)
    nproc = args.nproc or gpu_count()
    if nproc == 1:
        from simmatch.train import main as train_main

        return train_main(["--cfg", args.cfg, *flags, *args.overrides])
    from simmatch.launch.local import launch

    return launch(args.cfg, args.overrides, nproc, flags)


def gpu_count() -> int:
    """The GPUs here, at least 1 (torch is imported only for this: with --nproc the launcher
    starts its ranks without it, seconds sooner)."""
    import torch

    return max(1, torch.cuda.device_count())


def drop(args: argparse.Namespace) -> None:
    """--drop-images: recorded once, by this command, before any process starts."""
    from simmatch.config import load_config
    from simmatch.errors import UserError
    from simmatch.run.dropped import drop_images
    from simmatch.run.rundir import run_dir_of

    if "RANK" in os.environ:
        raise UserError("--drop-images is recorded by one process: run it once without torchrun or srun "
                        "(python tools/train.py --cfg ... --drop-images FILE --check), then start the run")
    cfg = load_config(args.cfg, args.overrides)
    run_dir = run_dir_of(cfg)
    from simmatch.shards.formats import data_format

    new = drop_images(run_dir.root, args.drop_images, data_format(cfg.data).split_dir("train"))
    print(f"dropped {len(new)} unlabeled image(s) from {run_dir} (listed in {run_dir.split('dropped')})"
          if new else f"every image of {args.drop_images} was already dropped from {run_dir}", flush=True)


def print_config(args: argparse.Namespace) -> int:
    from simmatch.config import load_config
    from simmatch.launch.recipe import recipe_lines

    cfg = load_config(args.cfg, args.overrides)
    world = args.world_size or int(os.environ.get("WORLD_SIZE", 0)) or args.nproc
    if not world:
        world = gpu_count()
    print("\n".join(recipe_lines(cfg, world)))
    return 0


if __name__ == "__main__":
    from simmatch.launch.process import run_cli

    run_cli(main)
