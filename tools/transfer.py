#!/usr/bin/env python
"""Transfer evaluation by linear classification on frozen features (SimCLR's and BYOL's protocol).

`python tools/transfer.py WEIGHTS DATA_TREE [--metric top1|mean_per_class] [--per-class] [--l2 W ...]
 [--format folder|cifar10|cifar100|svhn|stl10] [--cache DIR] [--arch A] [--size S] ...`
WEIGHTS: an export of tools/export.py (.safetensors, or .pth with its .safetensors beside it: the
model card gives the architecture and preprocessing), another ResNet weight file (--arch), or a run
directory / training checkpoint of this project (--which teacher|student). The features are the
trunk's pooled output, L2-normalised (the classifier dropped).
DATA_TREE: DATA_TREE/train/<class>/* and DATA_TREE/test/<class>/* (val/ is the test split when
there is no test/; with both, val/ is the validation split), or with --format an archive as
torchvision downloads it. Images: shorter side resized, centre crop, normalised; no augmentation.
The L2 weight of a multinomial logistic regression (L-BFGS) is chosen on the validation split
(default: a stratified, seeded 20 % of train) over --l2 (default: 45 log-spaced weights from 1e-6 to
1e5), then it is refitted on train + validation and scored on the test split. Features are cached
(DATA_TREE/.features/KEY.pt, or --cache DIR): a second run reads them. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from simmatch.errors import UserError, cli_errors  # noqa: E402


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"an L2 weight must be a positive number, not {text}")
    return value


def three_floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"three comma-separated numbers (R,G,B), not {text!r}")
    return values


def grid_lines(grid: list[list[float]], per_row: int = 5) -> list[str]:
    cells = [f"{l2:9.3g} {acc:6.2f}" for l2, acc in grid]
    return ["  " + "   ".join(cells[i:i + per_row]) for i in range(0, len(cells), per_row)]


@cli_errors
def main() -> int:
    from simmatch.engine.linear_eval import METRICS
    from simmatch.engine.transfer import FORMATS
    from simmatch.engine.transfer_weights import INTERPOLATIONS, Overrides

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights", help="export (.safetensors / .pth), weight file, run directory or checkpoint")
    ap.add_argument("data_tree", help="DATA_TREE with train/ and test/ (or val/) class folders, or an archive's folder")
    ap.add_argument("--metric", default="top1", choices=METRICS,
                    help="top1, or mean_per_class (the mean of the classes' accuracies: Pets, Flowers)")
    ap.add_argument("--per-class", action="store_true", help="print each class's test accuracy")
    ap.add_argument("--l2", type=positive_float, nargs="+", default=None,
                    help="L2 weights to choose from (default: 45 log-spaced, 1e-6 to 1e5); one skips the choice")
    ap.add_argument("--val-fraction", type=float, default=0.2,
                    help="share of each training class held out to choose the L2 weight (no val/ beside test/)")
    ap.add_argument("--seed", type=int, default=0, help="seed of that held-out draw")
    ap.add_argument("--format", default="folder", choices=FORMATS, help="folder tree (default) or a Table 1 archive")
    ap.add_argument("--cache", default=None, help="folder of the feature cache (default DATA_TREE/.features)")
    ap.add_argument("--which", default="teacher", choices=["student", "teacher"], help="a checkpoint's network")
    ap.add_argument("--which-ckpt", default="last", choices=["last", "best"], help="a run directory's checkpoint")
    ap.add_argument("--arch", default=None, help="architecture of a weight file without a model card")
    ap.add_argument("--small-input", default=None, choices=["true", "false"],
                    help="3x3 stride-1 stem without max-pool (default: the card's, else conv1's kernel)")
    ap.add_argument("--size", type=int, default=None,
                    help="centre crop (and shorter side) in px (default: the card's / run's, else 224)")
    ap.add_argument("--resize", type=int, default=None, help="shorter side in px before the crop")
    ap.add_argument("--mean", type=three_floats, default=None, help="R,G,B mean (default: the card's, else ImageNet's)")
    ap.add_argument("--std", type=three_floats, default=None, help="R,G,B std (default: the card's, else ImageNet's)")
    ap.add_argument("--interpolation", default="bicubic", choices=INTERPOLATIONS, help="of the resize")
    ap.add_argument("--max-iter", type=int, default=300, help="L-BFGS iterations of each fit")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2, help="image-decoding processes")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = ap.parse_args()
    for name in ("size", "resize", "max_iter", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    from simmatch.engine.transfer import run_transfer

    overrides = Overrides(args.arch, None if args.small_input is None else args.small_input == "true",
                          args.size, args.resize, args.mean, args.std, args.interpolation)
    res = run_transfer(args.weights, args.data_tree, args.format, args.metric, args.l2, args.val_fraction,
                       args.seed, args.cache, args.device, args.batch_size, max(0, args.workers), args.which,
                       args.which_ckpt, overrides, args.max_iter)
    stem = "small-input stem" if res["small_input"] else "ImageNet stem"
    which = f", {res['which']}" if res["which"] else ""
    print(f"weights: {res['weights']} ({res['weights_kind']}, {res['arch']}, {stem}{which})")
    print(f"images: {res['preprocess']}")
    print(f"train: {res['train_split']}; test: {res['test_split']}; {res['classes']} classes")
    print(f"features: {'read from the cache' if res['cache_hit'] else 'computed and cached in'} {res['cache']} "
          f"({res['feature_s']:.1f} s)")
    name = "top-1" if res["metric"] == "top1" else "mean per-class accuracy"
    if res["val_grid"]:
        print(f"validation: {res['validation']} ({res['n_val']} images; fitted on {res['n_train']}); "
              f"{name} (%) by L2 weight:")
        print("\n".join(grid_lines(res["val_grid"])))
    print(f"chosen L2 weight {res['l2']:.3g}" + (f" (validation {res['val_accuracy']:.2f}%)" if res["val_grid"] else "")
          + f"; refitted on train + validation ({res['n_train'] + res['n_val']} images) in {res['fit_s']:.1f} s")
    print(f"test {name}: {res['accuracy']:.2f}% ({res['n_test']} images)")
    if args.per_class or args.metric == "mean_per_class":
        print(f"  {'class':<20} {'accuracy':>9} {'images':>7}")
        for cls, row in res["per_class"].items():
            shown = f"{row['accuracy']:8.2f}%" if row["accuracy"] is not None else f"{'-':>9}"
            print(f"  {cls:<20} {shown} {row['images']:>7}")
    else:
        res.pop("per_class")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    from simmatch.launch.process import run_cli

    run_cli(main, heavy=("torch", "torchvision"))
