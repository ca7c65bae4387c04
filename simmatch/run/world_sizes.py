"""Which world sizes a run has trained at, for `tools/status.py`.

A run resumed on another number of ranks (an elastic resume) counts its iterations in steps of
the new global batch, so each world size is shown with the iterations it trained, each in its
own steps: "world sizes: 2 ranks (iterations 0-40), 1 rank (from iteration 80)". A world size is
the run's ranks; processes that ran several (virtual) ranks each are named too: "8 ranks on 4
processes (iterations 0-100)". The source is metrics.jsonl ("train" records carry "world_size";
a resume appends a "resume" record with "from_world_size"/"from_iteration"/"from_processes" and
the new "world_size"/"iteration"/"processes"; records without "processes" ran one rank per
process); runs written before those fields fall back to the newest checkpoint, then to the
submissions log.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from simmatch.run.jsonl import read_records
from simmatch.run.rundir import RunDir


@dataclass
class Span:
    """`world_size` ranks trained from `start` to `end` (None: still the current one), computed by
    `processes` processes (None: one rank each, as in records written before virtual ranks)."""

    world_size: int
    start: int
    end: int | None = None
    processes: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(ranks, processes): a change of either starts a new span."""
        return self.world_size, self.processes or self.world_size


def _int(value: object, default: int | None) -> int | None:
    return value if isinstance(value, int) else default


def spans_from_metrics(records: list[dict]) -> list[Span]:
    """The world sizes in the order the run had them; [] when no record names one."""
    spans: list[Span] = []
    for rec in records:
        if rec.get("kind") == "resume" and isinstance(rec.get("world_size"), int):
            old_world, left_at = rec.get("from_world_size"), rec.get("from_iteration")
            if not spans and isinstance(old_world, int):  # train records before it lacked world_size
                spans.append(Span(old_world, 0, left_at, _int(rec.get("from_processes"), old_world)))
            elif spans and left_at is not None:
                spans[-1].end = left_at  # where the resume took it from, whatever was logged after
            new = Span(rec["world_size"], rec.get("iteration", 0), rec.get("iteration", 0),
                       _int(rec.get("processes"), rec["world_size"]))
            if not spans or spans[-1].shape != new.shape:
                spans.append(new)
        elif rec.get("kind", "train") == "train" and isinstance(rec.get("world_size"), int):
            it, world = int(rec.get("iteration", 0)), rec["world_size"]
            same_world = bool(spans) and spans[-1].world_size == world
            # a train record without "processes" goes on with the current span's (or one rank each)
            procs = _int(rec.get("processes"), spans[-1].processes if same_world else world)
            new = Span(world, it, it, procs)
            if not spans:
                spans.append(Span(world, 0, it, procs))
            elif spans[-1].shape != new.shape:  # a change without its resume record
                spans.append(new)
            else:
                spans[-1].end = max(spans[-1].end or 0, it)
    if spans:
        spans[-1].end = None
    return spans


def spans_from_history(history: list[dict]) -> list[Span]:
    """A checkpoint's "world_history": where each world size started (its end is not kept)."""
    return [Span(int(h["world_size"]), int(h.get("iteration", 0)), None, _int(h.get("processes"), None))
            for h in history if isinstance(h, dict) and isinstance(h.get("world_size"), int)]


def processes_text(n: int) -> str:
    return f"{n} process{'' if n == 1 else 'es'}"


def running_text(ranks: int, processes: int) -> str:
    """What computes a run, as it is: '4 processes', '1 process running 8 virtual ranks (the
    8-GPU recipe)', '2 processes running 8 virtual ranks, 4 each (the 8-GPU recipe)'."""
    if ranks == processes:
        return processes_text(processes)
    each = "" if processes == 1 else f", {ranks // processes} each"
    return f"{processes_text(processes)} running {ranks} virtual ranks{each} (the {ranks}-GPU recipe)"


def ranks_text(n: int, processes: int | None = None) -> str:
    """'8 ranks', or '8 ranks on 4 processes' when processes computed several ranks each."""
    text = f"{n} rank{'' if n == 1 else 's'}"
    if processes and processes != n:
        text += f" on {processes_text(processes)}"
    return text


def describe(spans: list[Span]) -> str:
    """'2 ranks (iterations 0-40), 8 ranks on 4 processes (from iteration 80)'."""
    return ", ".join(f"{ranks_text(s.world_size, s.processes)} (iterations {s.start}-{s.end})" if s.end is not None
                     else f"{ranks_text(s.world_size, s.processes)} (from iteration {s.start})" for s in spans)


def _submitted_ranks(event: dict, processes: int) -> int:
    """The ranks a submission ran: train.virtual_world_size of its config and overrides when set,
    else its processes (also when its config cannot be read any more)."""
    from simmatch.config import load_config
    from simmatch.errors import UserError

    try:
        cfg = load_config(event.get("cfg"), list(event.get("overrides") or []))
    except (UserError, OSError, TypeError, ValueError):
        return processes
    return cfg.train.virtual_world_size or processes


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
                ranks = ranks_text(state["world_size"], _int(state.get("processes"), None))
                return f"world sizes: {ranks} (wrote {newest_checkpoint.name})"
    for e in reversed(submitted or []):
        if e.get("event") == "submitted" and isinstance(e.get("nodes"), int):
            n = e["nodes"] * int(e.get("tasks_per_node") or 1)
            return f"world sizes: {ranks_text(_submitted_ranks(e, n), n)} (as last submitted: {e['nodes']} " \
                   f"node(s) x {e.get('tasks_per_node') or 1} task(s))"
    return "world sizes: unknown (nothing trained or submitted yet)"
