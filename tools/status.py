#!/usr/bin/env python
"""Where a run stands: job state, its submissions and requeues, newest checkpoint, the world
sizes it has trained at (an elastic resume changes it; processes that ran several virtual ranks
each are named beside them), last metrics.

  python tools/status.py RUN_DIR [--lines 5] [--wait [--timeout S]]

The state comes from `scontrol show job` (no accounting needed) and, once SLURM has
forgotten the job, from the run's submissions log; a forgotten job the log shows no end of
(cancelled while pending) is NOT_FOUND and counts as ended. With --wait it returns when the
job has ended: exit 0 when the run finished, 1 otherwise (cancelled, failed, stopped, not
found), 3 when --timeout passed first.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from simmatch.errors import cli_errors  # noqa: E402
from simmatch.run.jsonl import read_records  # noqa: E402
from simmatch.run.rundir import RunDir  # noqa: E402
from slurm import submissions  # noqa: E402
from slurm.jobstate import UNKNOWN, is_ended, query_job  # noqa: E402
from slurm.launcher import LaunchError  # noqa: E402

_ENDINGS = {submissions.FINISHED: "COMPLETED", submissions.STOPPED: "STOPPED", submissions.FAILED: "FAILED"}


def _present(value: str | None) -> bool:
    """A field worth showing: scontrol writes an empty value or '(null)' for what is not set yet."""
    return value not in (None, "", "(null)", "None")


def run_state(run_dir: Path) -> tuple[str, str]:
    """(state, detail): SLURM's state of the newest job, or what the log says once it is gone.

    A job SLURM no longer knows (forgotten MinJobAge after its end) without an end in the log
    (cancelled while pending, killed before it could log) is NOT_FOUND, which counts as ended.
    """
    events = submissions.read_events(run_dir)
    job_id = submissions.last_job_id(events)
    if job_id is None:
        return "NO_JOB", "no SLURM submission logged (a local run?)"
    fields = query_job(job_id)
    state = fields["JobState"]
    if state not in ("NOT_FOUND", UNKNOWN):
        parts = [f"job {job_id}"]
        if _present(fields.get("NodeList")):
            parts[0] += f" on {fields['NodeList']}"
        parts.append(f"restarts {fields['Restarts'] if _present(fields.get('Restarts')) else 0}")
        if _present(fields.get("Reason")):
            parts.append(f"reason {fields['Reason']}")
        return state, ", ".join(parts)
    last = next((e for e in reversed(events) if e.get("job_id") == job_id and e["event"] in _ENDINGS), None)
    if last is not None:
        why = f" ({last['reason']})" if _present(last.get("reason")) else ""
        return _ENDINGS[last["event"]], f"job {job_id}, from the submissions log: {last['event']}{why}"
    if state == "NOT_FOUND":
        return "NOT_FOUND", (f"job {job_id}: SLURM no longer knows it and the submissions log shows no end "
                             "(cancelled while pending, or killed before it could log): counted as ended")
    return UNKNOWN, f"job {job_id}: scontrol did not answer" if shutil.which("scontrol") else \
        f"job {job_id}: no scontrol to ask"


def checkpoint_lines(run_dir: Path) -> list[str]:
    """The newest usable checkpoint, then every checkpoint with its integrity check."""
    from simmatch.checkpoint.store import usability

    found = [(it, path, usability(path)) for it, path in reversed(RunDir(run_dir).list_checkpoints())]
    if not found:
        return ["checkpoint: none yet"]
    usable = [(it, path) for it, path, use in found if not use.startswith("damaged")]
    lines = [f"checkpoint: iteration {usable[0][0]} ({usable[0][1].name}), the newest usable one" if usable
             else "checkpoint: none usable (a resume starts from scratch)"]
    lines += [f"  iteration {it:>8} ({path.name}): {use}" for it, path, use in found]
    return lines


def writer_line(run_dir: Path) -> str:
    from simmatch.run.lock import holder

    who = holder(run_dir)
    return f"writer:     {who} (holds {RunDir(run_dir).lock})" if who else "writer:     none"


def _history(events: list[dict]) -> list[str]:
    lines = []
    for e in events:
        what = e["event"]
        extra = [f"{k}={e[k]}" for k in ("reason", "iteration", "restart", "timeouts_left", "error")
                 if e.get(k) not in (None, "")]
        lines.append(f"  {e.get('time', '?')}  job {e.get('job_id', '?'):>9}  {what:<9} {' '.join(extra)}")
    return lines


def _metrics(run_dir: Path, n: int) -> str:
    records = read_records(RunDir(run_dir).metrics)  # skips a line being written or cut by a crash
    if not records:
        return "  (none yet)"
    import pandas as pd

    df = pd.DataFrame(records)
    out = []
    for kind, part in df.groupby("kind", sort=False) if "kind" in df else [("", df)]:
        part = part.dropna(axis=1, how="all").tail(n).copy()
        if "time" in part:  # unix seconds -> the local date and time
            seconds = pd.to_numeric(part["time"], errors="coerce")
            part["time"] = [time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t == t else "" for t in seconds]
        for column in ("iteration", "steps", "world_size"):  # counts: integers, not 25.0
            if column in part:
                part[column] = pd.to_numeric(part[column], errors="coerce").astype("Int64")
        out.append(f"  {kind}:\n" + "\n".join("    " + ln for ln in part.to_string(index=False).splitlines()))
    return "\n".join(out)


def report(run_dir: Path, lines: int) -> str:
    from simmatch.run.dropped import read_dropped
    from simmatch.run.world_sizes import world_sizes_line

    state, detail = run_state(run_dir)
    events = submissions.read_events(run_dir)
    newest = RunDir(run_dir).newest_checkpoint()
    sizes = world_sizes_line(run_dir, newest[1] if newest else None, events)
    dropped = read_dropped(RunDir(run_dir).splits)
    text = [f"run:        {run_dir}", f"state:      {state} ({detail})", writer_line(run_dir),
            *checkpoint_lines(run_dir), sizes,
            *([f"dropped:    {len(dropped)} unlabeled image(s), {', '.join(dropped[:3])}"
               f"{' ...' if len(dropped) > 3 else ''} ({RunDir(run_dir).split('dropped')})"] if dropped else []),
            "submissions:", *(_history(events) or ["  (none)"]),
            f"metrics (last {lines}):",
            _metrics(run_dir, lines)]
    return "\n".join(text)


@cli_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--lines", type=int, default=5, help="metrics rows shown per kind")
    p.add_argument("--wait", action="store_true", help="return once the job has ended")
    p.add_argument("--timeout", type=float, default=0, help="with --wait: give up after S seconds (0: never)")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir).resolve()
    if not run_dir.is_dir():
        raise LaunchError(f"no such run directory: {run_dir}")
    if args.wait:
        deadline = time.time() + args.timeout if args.timeout > 0 else float("inf")
        state, detail = run_state(run_dir)
        if state == UNKNOWN and shutil.which("scontrol") is None:  # nothing could ever answer
            raise LaunchError(f"--wait needs scontrol (SLURM's client) here: {detail}, the log shows no end")
        # Every state but UNKNOWN (scontrol did not answer: the controller may be restarting)
        # ends or moves on by itself; a forgotten job is NOT_FOUND, which is ended.
        while not (is_ended(state) or state in ("COMPLETED", "STOPPED", "NO_JOB")):
            if time.time() > deadline:
                print(report(run_dir, args.lines))
                print(f"still {state} after {args.timeout:.0f} s", file=sys.stderr)
                return 3
            time.sleep(2)
            state, detail = run_state(run_dir)
        print(report(run_dir, args.lines))
        if state == "NOT_FOUND":
            print(f"note: {detail}", file=sys.stderr)
        events = submissions.read_events(run_dir)
        finished = bool(events) and events[-1]["event"] == submissions.FINISHED
        return 0 if state == "COMPLETED" and finished else 1
    print(report(run_dir, args.lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
