"""A run's figures as the semi-supervised literature reports them, from its metrics.jsonl records
(the trainer's `finished` record, tools/summarize.py). No torch."""
from __future__ import annotations

LAST_EVALUATIONS = 20  # the median of the last 20 evaluations: how FixMatch's and USB's tables report


def evaluation_summary(records: list[dict]) -> dict[str, float | int | str]:
    """The teacher's (EMA model's) final and best top-1 over a run's evaluations and the median of
    the last LAST_EVALUATIONS of them (the figures the semi-supervised literature reports, each
    in some paper); k-NN top-1 for methods without a classifier. Empty without an evaluation."""
    by_iteration = {r.get("iteration"): r for r in records if r.get("kind") == "eval"}  # a resume's repeat: the last
    evals = [by_iteration[k] for k in sorted(by_iteration, key=lambda k: -1 if k is None else k)]
    metric = "teacher_top1" if any("teacher_top1" in r for r in evals) else "teacher_knn_top1"
    values = [float(r[metric]) for r in evals if r.get(metric) is not None]
    if not values:
        return {}
    last = sorted(values[-LAST_EVALUATIONS:])
    mid = len(last) // 2
    median = last[mid] if len(last) % 2 else (last[mid - 1] + last[mid]) / 2
    return {"metric": metric, "final": values[-1], "best": max(values), f"median_last{LAST_EVALUATIONS}": median,
            "evaluations": len(values)}


def finished_index(records: list[dict]) -> int | None:
    """Where the trainer's `finished` record is, when it is the run's newest progress record
    (`train`, `resume`, `finished`): the run is finished. None otherwise (still running, stopped,
    resumed for more, or a run from before that record existed)."""
    progress = [i for i, r in enumerate(records) if r.get("kind") in ("train", "resume", "finished")]
    return progress[-1] if progress and records[progress[-1]].get("kind") == "finished" else None
