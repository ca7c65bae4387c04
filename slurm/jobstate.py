"""Job states from `scontrol show job`, for clusters without accounting (no sacct).

submitit asks sacct for job states; without accounting storage it reads UNKNOWN forever and
`job.wait()` never returns for a job that was cancelled or crashed before writing its
result. Here states come from slurmctld itself, which knows every job until MinJobAge
after its end; a job it no longer knows is reported as NOT_FOUND, which counts as ended.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time

from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

# States after which a job will not run again by itself. Everything else (PENDING, RUNNING,
# REQUEUED, REQUEUE_HOLD, PREEMPTED, SUSPENDED, COMPLETING, CONFIGURING, ...) is "active".
ENDED = frozenset({"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED", "NOT_FOUND"})
UNKNOWN = "UNKNOWN"  # scontrol could not be asked: say nothing about the job
_FIELD = re.compile(r"(\w+)=(\S*)")


def query_job(job_id: str, timeout_s: float = 30.0) -> dict[str, str]:
    """scontrol's fields of the job (JobState, Reason, Restarts, NodeList, ...).

    {"JobState": "NOT_FOUND"} when slurmctld does not know the id, {"JobState": "UNKNOWN"}
    when there is no scontrol or it failed (the controller is down, a timeout).
    """
    if shutil.which("scontrol") is None:
        return {"JobState": UNKNOWN}
    try:
        proc = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)],  # ARRAY_INDEX: that element
                              capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return {"JobState": UNKNOWN}
    if proc.returncode != 0:
        invalid = "invalid job id" in (proc.stderr + proc.stdout).lower()
        return {"JobState": "NOT_FOUND" if invalid else UNKNOWN}
    line = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else ""
    fields = dict(_FIELD.findall(line))
    fields.setdefault("JobState", UNKNOWN)
    return fields


def job_state(job_id: str) -> str:
    return query_job(job_id)["JobState"]


def is_ended(state: str) -> bool:
    return state in ENDED


class ScontrolWatcher(SlurmInfoWatcher):
    """submitit's shared state cache, filled from scontrol instead of sacct."""

    def _make_command(self) -> list[str] | None:
        return None  # never call sacct

    def update(self) -> None:
        pending = self._registered - self._finished
        self._num_calls += 1
        for job_id in pending:
            fields = query_job(job_id)
            self._info_dict[job_id] = {"State": fields["JobState"], "NodeList": fields.get("NodeList", "")}
        self._last_status_check = time.time()
        for job_id in self._registered - self._finished:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)

    def is_done(self, job_id: str, mode: str = "standard") -> bool:
        return is_ended(self.get_state(job_id, mode=mode))


class ScontrolSlurmJob(SlurmJob):
    """A SlurmJob whose state (and so done()/wait()/results()) comes from scontrol."""

    watcher = ScontrolWatcher(delay_s=30)

    def wait_until_ended(self, timeout_s: float, poll_s: float = 1.0) -> str:
        """Poll until the job has ended; its final state (or the last one seen once its results
        are written and SLURM is slow to settle). Raises TimeoutError."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.done(force_check=True):
                settle = min(deadline, time.time() + 15)
                state = job_state(self.job_id)
                while not is_ended(state) and time.time() < settle:
                    time.sleep(0.5)
                    state = job_state(self.job_id)
                return state
            time.sleep(poll_s)
        raise TimeoutError(f"job {self.job_id} still {job_state(self.job_id)} after {timeout_s:.0f} s")
