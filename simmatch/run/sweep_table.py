"""A sweep's figures as a table: one row per point, the mean and standard deviation over its seeds
(tools/summarize.py DIR prints it, tools/plot.py DIR draws it).

The figure is any number of a run's metrics.jsonl: by default its final evaluation (the
teacher's top-1, or k-NN top-1 for methods without a classifier), or `best` / `median_last20`
over its evaluations, or any key, read from the newest record that holds it. Only finished runs
count; a point lists how many of its seeds are.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from simmatch.errors import UserError
from simmatch.run.jsonl import read_records
from simmatch.run.results import LAST_EVALUATIONS, evaluation_summary
from simmatch.run.rundir import RunDir
from simmatch.run.sweep import Sweep, load_sweep, run_finished

FINAL = "final"
SUMMARY_FIGURES = (FINAL, "best", f"median_last{LAST_EVALUATIONS}")


def figure_of(run_dir: Path, figure: str) -> tuple[str, float] | None:
    """(name, value) of `figure` in the run's metrics.jsonl; None where the run has no such number.
    `final`, `best`, `median_last20` name the evaluation summary's figures (named after its metric)."""
    records = read_records(RunDir(run_dir).metrics)
    if figure in SUMMARY_FIGURES:
        summary = evaluation_summary(records)
        if not summary:
            return None
        return (str(summary["metric"]) if figure == FINAL else f"{summary['metric']} {figure}",
                float(summary[figure]))
    for record in reversed(records):
        value = record.get(figure)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return figure, float(value)
    return None


def require_sweep(root: Path) -> Sweep:
    sweep = load_sweep(root)
    if sweep is None:
        raise UserError(f"{root}: no sweep.json (not a sweep directory made by tools/sweep.py)")
    return sweep


def sweep_rows(root: Path, figure: str = FINAL) -> tuple[str, list[dict]]:
    """(the figure's name, one dict per point: the grid's values, `seeds` finished of `of`, the
    seeds' `values`, `mean`, `std` (NaN with one value, None without))."""
    sweep = require_sweep(root)
    grouped: dict[str, dict] = {}
    names = set()
    for point in sweep.points():
        row = grouped.setdefault(point.name, {"point": point.name, **point.params, "seeds": 0, "of": 0,
                                              "values": [], "seed_list": []})
        row["of"] += 1
        run = Path(root) / point.rel
        found = figure_of(run, figure) if run_finished(run) else None
        if found is not None:
            names.add(found[0])
            row["seeds"] += 1
            row["values"].append(found[1])
            row["seed_list"].append(point.seed)
    for row in grouped.values():
        vals = row["values"]
        row["mean"] = statistics.mean(vals) if vals else None
        row["std"] = statistics.stdev(vals) if len(vals) > 1 else (math.nan if vals else None)
    if not names:
        raise UserError(f"{root}: no finished run has the figure {figure!r}")
    return " / ".join(sorted(names)), list(grouped.values())


def frame(rows: list[dict], grid: list[str]):
    """The rows as a pandas DataFrame: grid keys, seeds, mean, std."""
    import pandas as pd

    return pd.DataFrame([{**{k: r[k] for k in grid}, "seeds": r["seeds"], "of": r["of"], "mean": r["mean"],
                          "std": r["std"]} for r in rows])


def mean_std_text(row: dict) -> str:
    if row["mean"] is None:
        return "-"
    return f"{row['mean']:.2f}" if row["seeds"] == 1 else f"{row['mean']:.2f} ± {row['std']:.2f}"


def markdown(rows: list[dict], grid: list[str], figure: str) -> str:
    head = [*grid, "seeds", f"{figure} (mean ± std)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([*(str(r[k]) for k in grid), f"{r['seeds']} of {r['of']}",
                                        mean_std_text(r)]) + " |")
    return "\n".join(lines)
