#!/usr/bin/env python
"""Top-1 / top-5 of a checkpoint's student and teacher on its validation split.

`python tools/eval.py RUN_DIR|CKPT [--which student|teacher|both] [key=value ...]`
Overrides change the data (e.g. data.root=/other/copy). The last line is one JSON object.
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
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. data.root=DIR")
    args = ap.parse_args()
    from simmatch.evaluation import evaluate_checkpoint

    which = ("student", "teacher") if args.which == "both" else (args.which,)
    res = evaluate_checkpoint(args.source, args.overrides, which, args.device)
    print(f"{res['checkpoint']} (iteration {res['iteration']}), {res['count']} validation images")
    for name in which:
        print(f"  {name:<8} top-1 {res[f'{name}_top1']:6.2f}%  top-5 {res[f'{name}_top5']:6.2f}%")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
