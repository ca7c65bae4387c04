#!/usr/bin/env python
"""Plot the curves of one or several runs into a PNG: learning rate, every loss component,
the training diagnostics (mask rate, pseudo-label accuracy ...) and every evaluation metric
over iterations.

`python tools/plot.py RUN_DIR [RUN_DIR ...] [--out curves.png]` (default: RUN_DIR/curves.png)
Runs of different methods log different keys: each metric gets one panel, shared by every
run that has it, so that runs sit side by side in comparable panels (a run without that
metric is named in the panel as absent); a run has one colour in every panel. A metric a run
has one value of (a demo run evaluates once) is drawn as that value: a marker with the number
beside it, on an axis ticked at that value only. The panels drawn are listed on stdout.
Each run is drawn as the history that led to its newest weights: records of work lost to a
crash are left out, and after an elastic resume (another world size) the iterations before it
are re-expressed in steps of the last global batch, so that the curves stay continuous.

`python tools/plot.py SWEEP_DIR --x KEY [--hue KEY2] [--figure final] [--out sweep.png]`: a sweep
of tools/sweep.py as the paper's Figure 5 draws one: the figure (summarize.py's: the final
evaluation unless --figure) against the grid key KEY, mean +- std over the seeds as error bars,
one line per value of KEY2 (default: SWEEP_DIR/sweep.png). The lines drawn are listed on stdout.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from simmatch.engine.metrics import read_metrics, trained_history  # noqa: E402
from simmatch.errors import UserError, cli_errors  # noqa: E402

# bookkeeping, not curves: record kind, axes, times, throughput, world size, log-window step counts
NOT_PLOTTED = {"kind", "iteration", "logged_iteration", "time", "img_s", "world_size", "steps", "partial",
               "val_images", "total_iters"}


def numeric(df):
    """`df` with every plotted column as numbers: a value that is not one (a hand-edited or
    damaged line) becomes NaN and is left out of its panel instead of stopping the plot."""
    import pandas as pd

    df = df.copy()
    for column in df.columns:
        if column not in ("kind", "time"):
            df[column] = pd.to_numeric(df[column], errors="coerce")
    return df[df["iteration"].notna()] if "iteration" in df.columns else df


def panel_keys(frames: dict) -> list[tuple[str, str]]:
    """(kind, key) of each panel: lr, the losses, other training metrics, then evaluation."""
    train, evals = set(), set()
    for df in frames.values():
        for kind, keys in (("train", train), ("eval", evals)):
            rows = df[df["kind"] == kind] if "kind" in df.columns else df.iloc[0:0]
            keys.update(c for c in rows.columns if c not in NOT_PLOTTED and rows[c].notna().any())
    losses = sorted(k for k in train if k.startswith("loss"))
    losses = (["loss"] if "loss" in losses else []) + [k for k in losses if k != "loss"]
    others = sorted(k for k in train if k != "lr" and not k.startswith("loss"))
    order = (["lr"] if "lr" in train else []) + losses + others
    return [("train", k) for k in order] + [("eval", k) for k in sorted(evals)]


def run_colours(names) -> dict[str, str]:
    """One colour per run, the same in every panel (matplotlib's default cycle, in argument order)."""
    import matplotlib.pyplot as plt

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {name: cycle[i % len(cycle)] for i, name in enumerate(names)}


def single_value_axes(ax, points: list[tuple[float, float]]) -> None:
    """A panel where every run has one point (a demo run evaluates once) is no curve: ticks at the
    values and iterations only, and limits just around them (not matplotlib's +-5 %, which put a
    top-5 of 100 on an axis running to 104)."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    for values, set_lim, set_ticks in ((ys, ax.set_ylim, ax.set_yticks), (xs, ax.set_xlim, ax.set_xticks)):
        lo, hi = min(values), max(values)
        pad = max((hi - lo) * 0.5, max(abs(lo), abs(hi)) * 0.02) or 1.0
        set_lim(lo - pad, hi + pad)
        set_ticks(sorted(set(values)))


def draw(runs: list[Path]):
    """The figure of the runs' panels: (figure, each panel's title and the runs drawn in it, the runs
    whose iterations were re-expressed after an elastic resume). A run keeps one colour in every
    panel; a metric a run has one value of is drawn as that value (a marker and its number)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames, rescaled = {}, []
    for r in runs:
        frames[str(r)], changed = trained_history(numeric(read_metrics(r)))
        if changed:
            rescaled.append(str(r))
    panels = panel_keys(frames)
    if not panels:
        raise UserError(f"nothing to plot: no metrics in {', '.join(frames)}")
    colours = run_colours(frames)
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.4 * nrows), squeeze=False)
    drawn = []
    for ax, (kind, key) in zip(axes.flat, panels):
        names, singles = [], []
        for name, df in frames.items():
            rows = df[(df["kind"] == kind)] if "kind" in df.columns else df
            rows = rows[rows[key].notna()] if key in rows.columns else rows.iloc[0:0]
            if len(rows) == 1:
                x, y = float(rows["iteration"].iloc[0]), float(rows[key].iloc[0])
                ax.plot([x], [y], marker="o", linestyle="none", color=colours[name], label=name)
                ax.annotate(f"{y:.4g}", (x, y), xytext=(7, 0), textcoords="offset points", va="center",
                            fontsize=9, color=colours[name])
                singles.append((x, y))
            elif len(rows):
                ax.plot(rows["iteration"], rows[key], marker="." if len(rows) < 20 else None, color=colours[name],
                        label=name)
            if len(rows):
                names.append(name)
        if singles and len(singles) == len(names):
            single_value_axes(ax, singles)
        absent = [n for n in frames if n not in names]
        title = f"{key}" if kind == "train" else f"val {key}"
        ax.set_title(title + (f"\n(absent: {', '.join(Path(n).name for n in absent)})" if absent else ""),
                     fontsize=9)
        ax.set_xlabel("iteration" + (" (steps of the last global batch)" if rescaled else ""))
        if key == "lr" and len(singles) < len(names):
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if len(frames) > 1:
            ax.legend(fontsize=7)
        drawn.append((title, names))
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig, drawn, rescaled


def main_plot(runs: list[Path], out: str) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """Draw the panels into `out`; returns each panel's title and the runs drawn in it, and the
    runs whose iterations were re-expressed after an elastic resume."""
    import matplotlib.pyplot as plt

    fig, drawn, rescaled = draw(runs)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return drawn, rescaled


def as_number(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def draw_sweep(root: Path, x: str, hue: str | None, figure: str, out: str) -> list[str]:
    """Figure 5's kind of plot of a sweep into `out`; one text line per line drawn (its points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from simmatch.run.sweep_table import require_sweep, sweep_rows

    grid = require_sweep(root).grid
    for key, flag in ((x, "--x"), (hue, "--hue")):
        if key is not None and key not in grid:
            raise UserError(f"{flag} {key}: not a key of the sweep's grid ({', '.join(grid) or 'empty'})")
    if hue == x:
        raise UserError("--hue is another key than --x")
    name, rows = sweep_rows(root, figure)
    numeric_x = as_number(grid[x])
    position = dict(zip(grid[x], numeric_x or range(len(grid[x]))))
    fig, ax = plt.subplots(figsize=(5.5, 4))
    drawn = []
    for hue_value in grid[hue] if hue else [None]:
        others = [r for r in rows if hue is None or r[hue] == hue_value]
        for rest in sorted({tuple((k, r[k]) for k in grid if k not in (x, hue)) for r in others}):
            line = [r for r in others if all(r[k] == v for k, v in rest) and r["mean"] is not None]
            line.sort(key=lambda r: position[r[x]])
            if not line:
                continue
            label = ", ".join(f"{k}={v}" for k, v in ([(hue, hue_value)] if hue else []) + list(rest)) or name
            errs = [0.0 if r["seeds"] < 2 else r["std"] for r in line]
            ax.errorbar([position[r[x]] for r in line], [r["mean"] for r in line], yerr=errs, marker="o",
                        capsize=3, label=label)
            drawn.append(f"{label}: " + ", ".join(f"{x}={r[x]} {r['mean']:.2f}" for r in line))
    if not numeric_x:
        ax.set_xticks(range(len(grid[x])), grid[x])
    ax.set_xlabel(x)
    ax.set_ylabel(f"{name} (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return drawn


@cli_errors
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", default=None, help="PNG to write (default: curves.png in the first run directory)")
    ap.add_argument("--x", help="a sweep: the grid key along the x axis")
    ap.add_argument("--hue", help="a sweep: the grid key whose values are separate lines")
    ap.add_argument("--figure", default="final", help="a sweep: final, best, median_last20 or a metrics key")
    args = ap.parse_args()
    if len(args.runs) == 1 and (args.runs[0] / "sweep.json").is_file():
        if not args.x:
            raise UserError(f"{args.runs[0]} is a sweep: --x KEY names the grid key along the x axis")
        out = args.out or str(args.runs[0] / "sweep.png")
        lines = draw_sweep(args.runs[0], args.x, args.hue, args.figure, out)
        print(f"wrote {out}: {len(lines)} line(s)")
        print("\n".join(f"  {line}" for line in lines))
        return 0
    args.out = args.out or str(args.runs[0] / "curves.png")
    drawn, rescaled = main_plot(args.runs, args.out)
    print(f"wrote {args.out}: {len(drawn)} panels")
    for title, names in drawn:
        print(f"  {title.splitlines()[0]}: {', '.join(names)}")
    for name in rescaled:
        print(f"{name}: iterations before an elastic resume drawn in steps of the last global batch")
    return 0


if __name__ == "__main__":
    from simmatch.launch.process import run_cli

    run_cli(main)
