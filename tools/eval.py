#!/usr/bin/env python
"""Score a checkpoint's student and teacher on its validation split.

`python tools/eval.py RUN_DIR|CKPT [--which student|teacher|both] [--which-ckpt last|best] [--knn] [--linear]
 [key=value ...]`
`python tools/eval.py AUTHORS.pth --cfg yaml/in1k_1pct.yaml data.root=DIR [...]`: one of the SimMatch /
SimMatchV2 authors' released checkpoints (simmatch-1p.pth, 300ep-res50-1p.pth ...), which holds no
config; student = their `main` (what their --evaluate scores), teacher = their `ema`.
Default: the classifier's top-1 / top-5. --knn: weighted k-NN top-1 of the trunk's features
with the labeled set as memory (train.knn_k, train.knn_temperature). --linear: top-1 of a
linear probe (L-BFGS logistic regression) fitted on the frozen features of the labeled set.
Overrides change the data (e.g. data.root=/other/copy). The last line is one JSON object.
A run directory gives its newest checkpoint that passes its integrity check (a damaged newer
one is named and skipped); a named checkpoint file that fails it is an error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from simmatch.errors import cli_errors  # noqa: E402


@cli_errors
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="run directory (newest checkpoint) or checkpoint file")
    ap.add_argument("--which", default="both", choices=["student", "teacher", "both"])
    ap.add_argument("--knn", action="store_true", help="k-NN top-1 of the trunk's features")
    ap.add_argument("--linear", action="store_true", help="linear-probe top-1 on frozen features")
    ap.add_argument("--which-ckpt", default="last", choices=["last", "best"],
                    help="in a run directory: the newest checkpoint (last) or checkpoints/best.pt (best)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--cfg", default=None, help="the config of an authors' checkpoint (it holds none)")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. data.root=DIR")
    args = ap.parse_intermixed_args()  # options before or after the overrides
    from simmatch.engine.offline import evaluate_checkpoint

    which = ("student", "teacher") if args.which == "both" else (args.which,)
    modes = tuple(m for m, on in (("knn", args.knn), ("linear", args.linear)) if on) or ("classifier",)
    res = evaluate_checkpoint(args.source, args.overrides, which, args.device, modes, args.which_ckpt, args.cfg)
    print(f"{res['checkpoint']} ({res['source']}), {res['count']} validation images")
    for name in res["which"]:
        parts = [f"{label} {res[key]:6.2f}%" for label, key in
                 (("top-1", f"{name}_top1"), ("top-5", f"{name}_top5"),
                  ("k-NN top-1", f"{name}_knn_top1"), ("linear top-1", f"{name}_linear_top1"))
                 if key in res]
        print(f"  {name:<8} " + "  ".join(parts))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    from simmatch.launch.process import run_cli

    run_cli(main, heavy=("torch", "torchvision"))
