#!/usr/bin/env python
"""Plot loss, accuracy and mask-rate curves of one or several runs into a PNG.

`python tools/plot.py RUN_DIR [RUN_DIR ...] --out curves.png`
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from simmatch.engine.metrics import read_metrics  # noqa: E402
from simmatch.errors import cli_errors  # noqa: E402

PANELS = [("loss", "training loss"), ("mask", "mask rate"), ("pl_acc", "pseudo-label accuracy"),
          ("teacher_top1", "val top-1 (teacher)")]


@cli_errors
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", default="curves.png")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = {str(r): read_metrics(r) for r in args.runs}
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4))
    for ax, (key, title) in zip(axes, PANELS):
        for name, df in frames.items():
            if key in df.columns:
                rows = df[df[key].notna()]
                ax.plot(rows["iteration"], rows[key], marker="." if len(rows) < 20 else None, label=name)
        ax.set_title(title)
        ax.set_xlabel("iteration")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
