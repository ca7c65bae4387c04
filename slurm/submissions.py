"""The run's submissions log, RUN_DIR/submissions.jsonl: one JSON event per line.

It is the run's own history across SLURM jobs and requeues (SLURM forgets finished jobs
after MinJobAge and, without accounting, keeps no record at all): who submitted which
job id when, each start, each requeue with its reason, and how the run ended. Lines are
appended with O_APPEND in one write each, so concurrent writers never interleave a line.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from simmatch.run.jsonl import read_records
from simmatch.run.rundir import RunDir

# event names
SUBMITTED = "submitted"  # by tools/submit.py: job_id, nodes, tasks, cfg, overrides
STARTED = "started"  # by global rank 0 at each start of the job (restart = SLURM_RESTART_COUNT)
REQUEUED = "requeued"  # reason: "timeout" | "preemption" | "requeued by SLURM (scontrol requeue)"; iteration
FINISHED = "finished"  # training reached its last iteration
STOPPED = "stopped"  # interrupted and not requeued: cancelled, too many timeouts, ...
FAILED = "failed"  # the training raised


def log_path(run_dir: str | Path) -> Path:
    return RunDir(run_dir).submissions


def append_event(run_dir: str | Path, event: str, **fields: Any) -> dict:
    """Append one event (with wall time and host) and return it."""
    record = {"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "unix": round(time.time(), 3), "host": socket.gethostname(), **fields}
    path = log_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return record


def read_events(run_dir: str | Path) -> list[dict]:
    """All events, oldest first; a torn or foreign line is skipped, never fatal."""
    return [record for record in read_records(log_path(run_dir)) if "event" in record]


def last_job_id(events: list[dict]) -> str | None:
    """The id of the newest submitted job (requeues keep their job id)."""
    for record in reversed(events):
        if record.get("event") == SUBMITTED and record.get("job_id"):
            return str(record["job_id"])
    return None
