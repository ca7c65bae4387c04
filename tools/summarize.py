#!/usr/bin/env python
"""Validation accuracy of several runs, grouped over seeds: mean +- std per group.

  python tools/summarize.py runs/results/*            # a markdown table on stdout

A run's group is its directory name without a trailing `_s<seed>` (sup_s0, sup_s1 -> sup;
cifar10_40_s0 ... cifar10_40_s4 -> cifar10_40, the five runs of a Table 1 row). The figures are
the teacher's (the EMA model's) top-1 at the last evaluation, its best, and the median of its
last 20 evaluations (the three ways the literature reports), and the student's last top-1; k-NN
top-1 for runs without a classifier. Last line: one JSON object.
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


@cli_errors
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args()
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
