"""Every private part of submitit that the launcher relies on, in one place.

submitit has no public API for these; an upgrade could rename them and silently break
requeueing. setup.py therefore bounds submitit to the tested minor release (SUPPORTED), and
tests/cluster/test_submitit_compat.py checks each name below against the installed submitit so
that an upgrade fails the suite loudly instead of a job failing to requeue.

- the name of the USR2 handler submitit installs in a job (`SignalHandler.checkpoint_and_try_requeue`),
  recognised before the trainer replaces it;
- the time-outs a job has left (`SignalHandler._delayed._timeout_countdown`), logged with a requeue;
- the sbatch script text (`SlurmExecutor._make_submission_file_text(_submitit_command_str, uid)`),
  printed by `tools/submit.py --dry-run`;
- the state cache that slurm/jobstate.py fills from scontrol (`SlurmInfoWatcher._make_command`,
  `_registered`, `_finished`, `_info_dict`, `_num_calls`, `_last_status_check`).
"""
from __future__ import annotations

from typing import Any

SUPPORTED = (1, 5)  # major, minor of the submitit release these names were checked against
REQUEUE_HANDLER_NAME = "checkpoint_and_try_requeue"
WATCHER_ATTRIBUTES = ("_registered", "_finished", "_info_dict", "_num_calls", "_last_status_check")


def is_requeue_handler(handler: Any) -> bool:
    """Is `handler` (a signal handler) submitit's USR2 checkpoint-and-requeue method?"""
    return getattr(handler, "__name__", "") == REQUEUE_HANDLER_NAME


def timeouts_left(handler: Any, timed_out: bool) -> int | None:
    """How many more time-outs submitit will requeue once this stop (a time-out when
    `timed_out`) is counted; None when `handler` is not submitit's."""
    owner = getattr(handler, "__self__", None)
    left = getattr(getattr(owner, "_delayed", None), "_timeout_countdown", None)
    return None if left is None else left - int(timed_out)


def has_timed_out(handler: Any) -> bool:
    owner = getattr(handler, "__self__", None)
    return bool(owner.has_timed_out()) if owner is not None else False


def submission_script(executor: Any, uid: str = "dry-run") -> str:
    """The sbatch script `executor` would submit (its log paths still hold %j)."""
    return executor._make_submission_file_text(executor._submitit_command_str, uid)


def version() -> tuple[int, ...]:
    import submitit

    return tuple(int(p) for p in submitit.__version__.split(".")[:2] if p.isdigit())
