"""Which world sizes a run has trained at, for `tools/status.py`.

A run resumed on another number of ranks (an elastic resume) counts its iterations in steps of
the new global batch, so each world size is shown with the iterations it trained, each in its
own steps: "world sizes: 2 ranks (iterations 0-40), 1 rank (from iteration 80)". The source is
metrics.jsonl ("train" records carry "world_size"; a resume appends a "resume" record with
"from_world_size"/"from_iteration" and the new "world_size"/"iteration"); runs written before
those fields fall back to the newest checkpoint, then to the submissions log.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from simmatch.run.jsonl import read_records
from simmatch.run.rundir import RunDir


@dataclass
class Span:
    """`world_size` ranks trained from `start` to `end` (None: still the current one)."""

    world_size: int
    start: int
    end: int | None = None


def spans_from_metrics(records: list[dict]) -> list[Span]:
    """The world sizes in the order the run had them; [] when no record names one."""
    spans: list[Span] = []
    for rec in records:
        if rec.get("kind") == "resume" and isinstance(rec.get("world_size"), int):
            old_world, left_at = rec.get("from_world_size"), rec.get("from_iteration")
            if not spans and isinstance(old_world, int):
                spans.append(Span(old_world, 0, left_at))  # train records before it lacked world_size
            elif spans and left_at is not None:
                spans[-1].end = left_at  # where the resume took it from, whatever was logged after
            if not spans or spans[-1].world_size != rec["world_size"]:
                it = rec.get("iteration", 0)
                spans.append(Span(rec["world_size"], it, it))
        elif rec.get("kind", "train") == "train" and isinstance(rec.get("world_size"), int):
            it = int(rec.get("iteration", 0))
            if not spans:
                spans.append(Span(rec["world_size"], 0, it))
            elif spans[-1].world_size != rec["world_size"]:  # a change without its resume record
                spans.append(Span(rec["world_size"], it, it))
            else:
                spans[-1].end = max(spans[-1].end or 0, it)
    if spans:
        spans[-1].end = None
    return spans


def spans_from_history(history: list[dict]) -> list[Span]:
    """A checkpoint's "world_history": where each world size started (its end is not kept)."""
    return [Span(int(h["world_size"]), int(h.get("iteration", 0))) for h in history
            if isinstance(h, dict) and isinstance(h.get("world_size"), int)]


def _ranks(n: int) -> str:
    return f"{n} rank{'' if n == 1 else 's'}"


def describe(spans: list[Span]) -> str:
    """'2 ranks (iterations 0-40), 1 rank (from iteration 80)'."""
    return ", ".join(f"{_ranks(s.world_size)} (iterations {s.start}-{s.end})" if s.end is not None
                     else f"{_ranks(s.world_size)} (from iteration {s.start})" for s in spans)


def world_sizes_line(run_dir: Path, newest_checkpoint: Path | None = None,
                     submitted: list[dict] | None = None) -> str:
    """status's line: from metrics.jsonl, else the newest checkpoint (read through mmap: its
    tensors are not read), else the submissions log's nodes x tasks per node."""
    spans = spans_from_metrics(read_records(RunDir(run_dir).metrics))
    if spans:
        return f"world sizes: {describe(spans)}"
    if newest_checkpoint is not None:
        try:
            import torch

            state = torch.load(newest_checkpoint, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            state = None
        if isinstance(state, dict):
            spans = spans_from_history(state.get("world_history") or [])
            if spans:
                return f"world sizes: {describe(spans)} (checkpoint {newest_checkpoint.name})"
            if isinstance(state.get("world_size"), int):
                return f"world sizes: {_ranks(state['world_size'])} (wrote {newest_checkpoint.name})"
    for e in reversed(submitted or []):
        if e.get("event") == "submitted" and isinstance(e.get("nodes"), int):
            n = e["nodes"] * int(e.get("tasks_per_node") or 1)
            return f"world sizes: {_ranks(n)} (as last submitted: {e['nodes']} node(s) x " \
                   f"{e.get('tasks_per_node') or 1} task(s))"
    return "world sizes: unknown (nothing trained or submitted yet)"
