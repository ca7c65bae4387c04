#!/usr/bin/env python
"""Where a run stands: job state, its submissions and requeues, newest checkpoint, the world
sizes it has trained at (an elastic resume changes it; processes that ran several virtual ranks
each are named beside them), last metrics.

  python tools/status.py RUN_DIR [--lines 5] [--wait [--timeout S]]
  python tools/status.py SWEEP_DIR [--wait [--timeout S]]   # one line per point of a tools/sweep.py sweep

For a SLURM run the state comes from `scontrol show job` (no accounting needed) and, once
SLURM has forgotten the job, from the run's submissions log; a forgotten job the log shows no
end of (cancelled while pending) is NOT_FOUND and counts as ended. A run SLURM did not run is
running (a process holds the run's lock), or stopped (the same command resumes it). A run whose
metrics.jsonl ends with the trainer's `finished` record also says
`finished (iteration N of N, top-1 teacher T% / student S%)`, from its final evaluation.
With --wait it returns when the job (or the local process) has ended: exit 0 when the run
finished, 1 otherwise (cancelled, failed, stopped, not found), 3 when --timeout passed first.
A hand-edited metrics.jsonl (lists, text or huge numbers where numbers belong) prints as written.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from simmatch.errors import cli_errors  # noqa: E402
from simmatch.run.jsonl import read_records  # noqa: E402
from simmatch.run.lock import holder  # noqa: E402
from simmatch.run.results import finished_index  # noqa: E402
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
    last = next((e for e in reversed(events) if str(e.get("job_id")) == job_id and str(e["event"]) in _ENDINGS), None)
    if last is not None:
        why = f" ({_cell(last['reason'])})" if _present(last.get("reason")) else ""
        return _ENDINGS[str(last["event"])], f"job {job_id}, from the submissions log: {last['event']}{why}"
    if state == "NOT_FOUND":
        return "NOT_FOUND", (f"job {job_id}: SLURM no longer knows it and the submissions log shows no end "
                             "(cancelled while pending, or killed before it could log): counted as ended")
    return UNKNOWN, f"job {job_id}: scontrol did not answer" if shutil.which("scontrol") else \
        f"job {job_id}: no scontrol to ask"


def checkpoint_lines(found: list[tuple[int, Path, str]]) -> list[str]:
    """The newest usable checkpoint, then every checkpoint with its integrity check (`found`:
    checkpoints_checked)."""
    if not found:
        return ["checkpoint: none yet"]
    usable = [(it, path) for it, path, use in found if not use.startswith("damaged")]
    lines = [f"checkpoint: iteration {usable[0][0]} ({usable[0][1].name}), the newest usable one" if usable
             else "checkpoint: none usable (a resume starts from scratch)"]
    lines += [f"  iteration {it:>8} ({path.name}): {use}" for it, path, use in found]
    return lines


def checkpoints_checked(run_dir: Path) -> list[tuple[int, Path, str]]:
    """(iteration, path, integrity check) of every checkpoint, newest first."""
    from simmatch.checkpoint.store import usability

    return [(it, path, usability(path)) for it, path in reversed(RunDir(run_dir).list_checkpoints())]


def _number(value) -> float | None:
    """A JSON value as a finite number, or None (text, a list, a boolean, NaN, inf: a hand edit)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:  # an integer too large for a float
        return None
    return value if math.isfinite(value) else None


def _count_text(value) -> str:
    """An iteration or count as written: 400, not 400.0; anything else as its JSON text."""
    number = _number(value)
    if number is not None and number.is_integer() and abs(number) < 2 ** 53:
        return str(int(number))
    return str(_cell(value))


def finished_text(records: list[dict]) -> str | None:
    """'finished (iteration N of N, top-1 teacher T% / student S%)' when the run's newest training
    record is the trainer's `finished` record (written after the final evaluation); None otherwise
    (still running, stopped, resumed for more, or a run from before that record existed)."""
    at = finished_index(records)
    if at is None:
        return None
    end = records[at]
    text = f"iteration {_count_text(end.get('iteration'))} of {_count_text(end.get('total_iters'))}"
    final = next((r for r in reversed(records[:at]) if r.get("kind") == "eval"
                  and _number(r.get("iteration")) is not None and r.get("iteration") == end.get("iteration")), None)
    if final is not None:
        for label, key in (("top-1", "top1"), ("k-NN top-1", "knn_top1")):
            values = [(who, _number(final.get(f"{who}_{key}"))) for who in ("teacher", "student")]
            shown = [f"{who} {value:.2f}%" for who, value in values if value is not None]
            if shown:
                text += f", {label} {' / '.join(shown)}"
    return f"finished ({text})"


def state_line(run_dir: Path, state: str, detail: str, records: list[dict], usable: list[int]) -> str:
    """SLURM's state and the run's own: finished (from metrics.jsonl's `finished` record), or, for
    a run SLURM did not run, running (a process holds the run's lock) or stopped."""
    finished = finished_text(records)
    if state != "NO_JOB":
        return f"state:      {state} ({detail})" + (f"; {finished}" if finished else "")
    if finished:
        return f"state:      {finished}"
    who = holder(run_dir)
    if who:
        return f"state:      running (local, {who})"
    if usable:
        return (f"state:      stopped (local run; iteration {usable[0]}, the newest checkpoint; "
                "the same command resumes it)")
    if records:
        return "state:      stopped (local run; no checkpoint yet: the same command starts it again)"
    return "state:      not started (no metrics, no checkpoint, no SLURM submission)"


def writer_line(run_dir: Path) -> str:
    who = holder(run_dir)
    return f"writer:     {who} (holds {RunDir(run_dir).lock})" if who else "writer:     none"


def _history(events: list[dict]) -> list[str]:
    lines = []
    for e in events:
        what = str(_cell(e["event"]))  # a hand-edited log: any JSON value prints as written
        extra = [f"{k}={_cell(e[k])}" for k in ("reason", "iteration", "restart", "timeouts_left", "error")
                 if e.get(k) not in (None, "")]
        lines.append(f"  {_cell(e.get('time', '?'))}  job {str(_cell(e.get('job_id', '?'))):>9}  {what:<9} "
                     f"{' '.join(extra)}")
    return lines


def _cell(value):
    """A JSON value as a table cell: a number as it is, anything else (a list, an object, a
    boolean, null, an integer too large for a float) as its JSON text; a hand-edited line never
    stops the table."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) or isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2 ** 63:
        return value
    return json.dumps(value)


def _when(value) -> str:
    """Unix seconds as the local date and time; anything else as written."""
    seconds = _number(value)
    try:
        if seconds is not None:
            return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))
    except (OverflowError, OSError, ValueError):  # beyond the dates this platform has
        pass
    return str(_cell(value))


def _metrics(records: list[dict], n: int) -> str:
    """The last `n` records of each kind as tables (read_records skips a line being written or cut
    by a crash)."""
    if not records:
        return "  (none yet)"
    import pandas as pd

    kinds: dict[str, list[dict]] = {}
    for record in records:
        kind = record.get("kind", "")
        kinds.setdefault(kind if isinstance(kind, str) else json.dumps(kind), []).append(record)
    out = []
    for kind, part in kinds.items():
        rows = []
        for record in part[-n:]:
            row = {k: _cell(v) for k, v in record.items() if v is not None}
            if "time" in row:  # unix seconds -> the local date and time
                row["time"] = _when(record["time"])
            for column in ("iteration", "steps", "world_size", "total_iters"):  # counts: 25, not 25.0
                if column in row:
                    row[column] = _count_text(record[column])
            rows.append(row)
        table = pd.DataFrame(rows)
        for column in table:  # a field some rows lack: blank among text, NaN among numbers (as pandas shows)
            if table[column].dtype == object:
                table[column] = table[column].fillna("")
        header = f"  {kind}:" if kind else "  (no kind):"
        out.append(header + "\n" + "\n".join("    " + ln for ln in table.to_string(index=False).splitlines()))
    return "\n".join(out)


def point_state(run_dir: Path) -> tuple[str, bool, bool]:
    """(the run's state in one line, whether it has ended: finished, or nothing trains it now,
    whether it is finished)."""
    if not run_dir.is_dir():
        return "not started", True, False
    records = read_records(RunDir(run_dir).metrics)
    newest = RunDir(run_dir).newest_checkpoint()
    state, detail = run_state(run_dir)
    text = state_line(run_dir, state, detail, records, [newest[0]] if newest else []).split(None, 1)[1]
    finished = finished_index(records) is not None
    if state == "NO_JOB":
        return text, finished or not holder(run_dir), finished
    return text, finished or is_ended(state) or state in ("COMPLETED", "STOPPED"), finished


def sweep_report(root: Path) -> tuple[str, bool, bool]:
    """The sweep's points, one line each; (text, every run ended, every run finished)."""
    from simmatch.run.sweep import load_sweep

    sweep = load_sweep(root)
    points = sweep.points()
    states = [(p, *point_state(root / p.rel)) for p in points]
    done = sum(finished for *_, finished in states)
    width = max(len(p.rel) for p in points)
    grid = ", ".join(f"{k}: {len(v)}" for k, v in sweep.grid.items())
    lines = [f"sweep:      {root} ({len(points)} runs; grid {grid or 'none'}; seeds {sweep.seeds})",
             f"finished:   {done} of {len(points)}",
             *(f"  {p.rel:<{width}}  {text}" for p, text, *_ in states)]
    return "\n".join(lines), all(ended for _, _, ended, _ in states), done == len(points)


def report(run_dir: Path, lines: int) -> str:
    from simmatch.run.dropped import read_dropped
    from simmatch.run.world_sizes import world_sizes_line

    state, detail = run_state(run_dir)
    events = submissions.read_events(run_dir)
    records = read_records(RunDir(run_dir).metrics)
    found = checkpoints_checked(run_dir)
    usable = [it for it, _, use in found if not use.startswith("damaged")]
    newest = RunDir(run_dir).newest_checkpoint()
    sizes = world_sizes_line(run_dir, newest[1] if newest else None, events)
    dropped = read_dropped(RunDir(run_dir).splits)
    text = [f"run:        {run_dir}", state_line(run_dir, state, detail, records, usable), writer_line(run_dir),
            *checkpoint_lines(found), sizes,
            *([f"dropped:    {len(dropped)} unlabeled image(s), {', '.join(dropped[:3])}"
               f"{' ...' if len(dropped) > 3 else ''} ({RunDir(run_dir).split('dropped')})"] if dropped else []),
            "submissions:", *(_history(events) or ["  (none)"]),
            f"metrics (last {lines}):",
            _metrics(records, lines)]
    return "\n".join(text)


def sweep_main(root: Path, args: argparse.Namespace) -> int:
    """A sweep's status; with --wait, once every point has ended: 0 when all finished."""
    deadline = time.time() + args.timeout if args.timeout > 0 else float("inf")
    text, ended, finished = sweep_report(root)
    while args.wait and not ended:
        if time.time() > deadline:
            print(text)
            print(f"some runs still going after {args.timeout:.0f} s", file=sys.stderr)
            return 3
        time.sleep(2)
        text, ended, finished = sweep_report(root)
    print(text)
    return (0 if finished else 1) if args.wait else 0


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
    if (run_dir / "sweep.json").is_file():
        return sweep_main(run_dir, args)
    if args.wait:
        deadline = time.time() + args.timeout if args.timeout > 0 else float("inf")
        state, detail = run_state(run_dir)
        if state == UNKNOWN and shutil.which("scontrol") is None:  # nothing could ever answer
            raise LaunchError(f"--wait needs scontrol (SLURM's client) here: {detail}, the log shows no end")
        # Every state but UNKNOWN (scontrol did not answer: the controller may be restarting)
        # ends or moves on by itself; a forgotten job is NOT_FOUND, which is ended.
        # A local run (no SLURM job) has ended when no process holds its lock.
        while not (is_ended(state) or state in ("COMPLETED", "STOPPED") or state == "NO_JOB" and not holder(run_dir)):
            if time.time() > deadline:
                print(report(run_dir, args.lines))
                print(f"still {'running' if state == 'NO_JOB' else state} after {args.timeout:.0f} s", file=sys.stderr)
                return 3
            time.sleep(2)
            state, detail = run_state(run_dir)
        print(report(run_dir, args.lines))
        if state == "NOT_FOUND":
            print(f"note: {detail}", file=sys.stderr)
        if state == "NO_JOB":
            return 0 if finished_text(read_records(RunDir(run_dir).metrics)) else 1
        events = submissions.read_events(run_dir)
        finished = bool(events) and events[-1]["event"] == submissions.FINISHED
        return 0 if state == "COMPLETED" and finished else 1
    print(report(run_dir, args.lines))
    return 0


if __name__ == "__main__":
    from simmatch.launch.process import run_cli

    run_cli(main)
