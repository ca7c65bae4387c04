#!/usr/bin/env python
"""Validation accuracy of several runs, grouped over seeds: mean +- std per group.

  python tools/summarize.py runs/results/*            # a markdown table on stdout

A run's group is its directory name without a trailing `_s<seed>` (sup_s0, sup_s1 -> sup;
cifar10_40_s0 ... cifar10_40_s4 -> cifar10_40, the five runs of a Table 1 row). The figures are
the teacher's (the EMA model's) top-1 at the last evaluation, its best, and the median of its
last 20 evaluations (the three ways the literature reports), and the student's last top-1; k-NN
top-1 for runs without a classifier. Last line: one JSON object.

  python tools/summarize.py SWEEP_DIR [--figure KEY] [--csv FILE]   # a sweep of tools/sweep.py

A sweep gives one row per point: its grid values, how many seeds finished, and the mean +- std
over them of the figure: by default each run's final evaluation (teacher top-1; k-NN top-1
without a classifier), or `best`, `median_last20`, or any key of metrics.jsonl (its newest
value, e.g. student_top1). The table as markdown, as CSV (SWEEP_DIR/summary.csv unless --csv),
and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from simmatch.engine.metrics import read_metrics  # noqa: E402
from simmatch.errors import UserError, cli_errors  # noqa: E402
from simmatch.run.jsonl import read_records  # noqa: E402
from simmatch.run.results import LAST_EVALUATIONS, evaluation_summary  # noqa: E402
from simmatch.run.rundir import RunDir  # noqa: E402

FIGURES = ("teacher_top1", "student_top1", "teacher_knn_top1", "student_knn_top1")


def final_eval(run: Path) -> dict[str, float]:
    df = read_metrics(run)
    evals = df[df["kind"] == "eval"] if "kind" in df else df.iloc[0:0]
    if evals.empty:
        raise UserError(f"{run}: no evaluation in metrics.jsonl (did the run finish?)")
    last = evals.iloc[-1]
    out = {k: float(last[k]) for k in FIGURES if k in last and last[k] == last[k]}
    summary = evaluation_summary(read_records(RunDir(run).metrics))
    out["best"], out["median"] = float(summary["best"]), float(summary[f"median_last{LAST_EVALUATIONS}"])
    return out


def group_of(run: Path) -> str:
    return re.sub(r"_s\d+$", "", run.name)


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def summarize_sweep(root: Path, figure: str, csv: Path | None) -> int:
    from simmatch.files.atomic import atomic_write_text
    from simmatch.run.sweep_table import frame, markdown, require_sweep, sweep_rows

    grid = list(require_sweep(root).grid)
    name, rows = sweep_rows(root, figure)
    print(markdown(rows, grid, name))
    csv = csv or root / "summary.csv"
    atomic_write_text(csv, frame(rows, grid).to_csv(index=False))
    print(f"wrote {csv}")
    points = [{k: r[k] for k in ("point", *grid, "seeds", "of", "values", "seed_list", "mean", "std")} for r in rows]
    print(json.dumps({"sweep": str(root), "figure": name, "points": points}).replace("NaN", "null"))
    return 0


@cli_errors
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--figure", default="final", help="a sweep's figure: final, best, median_last20, or a "
                                                      "metrics.jsonl key")
    ap.add_argument("--csv", type=Path, help="a sweep's table as CSV (default: SWEEP_DIR/summary.csv)")
    args = ap.parse_args()
    if len(args.runs) == 1 and (args.runs[0] / "sweep.json").is_file():
        return summarize_sweep(args.runs[0], args.figure, args.csv)
    groups: dict[str, list[dict[str, float]]] = {}
    for run in args.runs:
        groups.setdefault(group_of(run), []).append(final_eval(run))
    print(f"| runs | seeds | teacher top-1 (%) | best | median of last {LAST_EVALUATIONS} | student top-1 (%) |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for name, evals in groups.items():
        kind = "" if "teacher_top1" in evals[0] else "knn_"
        teacher = [e[f"teacher_{kind}top1"] for e in evals]
        student = [e[f"student_{kind}top1"] for e in evals]
        best, median = [e["best"] for e in evals], [e["median"] for e in evals]
        label = name + (" (k-NN)" if kind else "")
        print(f"| {label} | {len(evals)} | {mean_std(teacher)} | {mean_std(best)} | {mean_std(median)} "
              f"| {mean_std(student)} |")
        summary[name] = {"n": len(evals), "teacher": teacher, "student": student, "metric": kind + "top1",
                         "teacher_best": best, f"teacher_median_last{LAST_EVALUATIONS}": median}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    from simmatch.launch.process import run_cli

    run_cli(main)
