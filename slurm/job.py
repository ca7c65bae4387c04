"""The submitted callable: trains in the job, then requeues through submitit when interrupted.

Requeue protocol (submitit's USR2 handler would requeue and exit on rank 0 at once, with
no chance for the ranks to save together):
1. the job captures submitit's USR2 handler before calling `simmatch.train.run`;
2. `run` replaces it while training: on SIGTERM/USR2 every rank stops at the same step,
   they save one checkpoint collectively and `run` returns status "interrupted";
3. global rank 0 then calls the captured handler itself: submitit calls `checkpoint()`
   (which logs the requeue), counts time-outs against max_requeues, runs
   `scontrol requeue` and exits; the other ranks wait to be stopped by the requeue;
4. the requeued job (same job id, same run directory) resumes from the newest checkpoint.
A SIGTERM without USR2 (scancel, or an admin's `scontrol requeue`) is not requeued by us: the
run is logged as stopped (cancelled) or, when SLURM itself has requeued the job (its restart
count went up), as requeued by SLURM.
"""
from __future__ import annotations

import importlib
import os
import random
import signal
import socket
import sys
import time
from typing import Any

from simmatch.launch.process import preload
from simmatch.run.rundir import RunDir
from slurm import submissions, submitit_compat
from slurm.jobstate import UNKNOWN, query_job


def master_address(name: str) -> str:
    """`name` when it resolves, else 127.0.0.1 (emulated node names such as n1 do not)."""
    try:
        socket.getaddrinfo(name, None)
        return name
    except (socket.gaierror, UnicodeError):
        return "127.0.0.1"


def export_distributed_env(job_env: Any) -> Any:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from submitit's job environment.

    CUDA_VISIBLE_DEVICES is left alone: the trainer picks cuda:(LOCAL_RANK mod visible GPUs),
    right both where every task sees the node's GPUs and where the site binds one per task. The
    port changes with SLURM_RESTART_COUNT so that a requeued job never meets the previous run's
    store socket.
    """
    from submitit.helpers import TorchDistributedEnvironment

    env = TorchDistributedEnvironment()
    resolved = master_address(env.master_addr)
    if resolved != env.master_addr and job_env.num_nodes > 1 and job_env.global_rank == 0:
        print(f"launcher: node name {env.master_addr!r} does not resolve; MASTER_ADDR=127.0.0.1 "
              "(right only when every node is this machine)", file=sys.stderr, flush=True)
    env.master_addr = resolved
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    # below Linux's ephemeral range (32768-60999 by default), where the kernel picks the ports of other
    # processes' connections on the node: such a port may be taken when the store binds
    env.master_port = random.Random(f"{job_env.job_id}.{restart}").randint(20000, 32767)
    env.export(set_cuda_visible_devices=False, overwrite=True)
    # one CPU thread set per task, not one per core per task
    os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
    return env


def job_environment() -> Any | None:
    """submitit's JobEnvironment inside a submitit job, else None (a plain call)."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    from submitit import JobEnvironment

    return JobEnvironment()


def _main_process_only(handler: Any) -> Any:
    main_pid = os.getpid()

    def guarded(signum: int, frame: Any) -> None:
        if os.getpid() == main_pid:
            handler(signum, frame)

    guarded.__name__ = "checkpoint_and_try_requeue_in_main_process"
    return guarded


def _is_submitit_handler(handler: Any) -> bool:
    return submitit_compat.is_requeue_handler(handler)


def _newest_checkpoint_iteration(run_dir: str) -> int | None:
    newest = RunDir(run_dir).newest_checkpoint()
    return newest[0] if newest else None


class TrainJob:
    """The submitted callable: `simmatch.train.run(cfg_path, overrides + [train.run_dir=...])`.

    `allow_config_change` is tools/submit.py's --allow-config-change, carried into the job (and
    its requeues) because the job, not the submitting shell, resumes the run with the new config.
    """

    WAIT_FOR_REQUEUE_S = 180  # non-zero ranks: how long to wait for rank 0's requeue to stop them

    def __init__(self, cfg_path: str | None, overrides: list[str], run_dir: str,
                 entry: str = "simmatch.train:run", allow_config_change: bool = False) -> None:
        self.cfg_path = cfg_path
        self.overrides = list(overrides)
        self.run_dir = str(run_dir)
        self.entry = entry  # module:function with run's signature (tests use a stand-in)
        self.allow_config_change = allow_config_change
        self._transient()

    def _transient(self) -> None:
        self._submitit_handler: Any = None
        self._late_usr2 = False
        self._iteration: int | None = None
        self._signum: int | None = None

    def __getstate__(self) -> dict:
        return {"cfg_path": self.cfg_path, "overrides": self.overrides, "run_dir": self.run_dir,
                "entry": self.entry, "allow_config_change": self.allow_config_change}

    def __setstate__(self, state: dict) -> None:
        self.allow_config_change = False  # pickled before the flag existed
        self.__dict__.update(state)
        self._transient()

    def __repr__(self) -> str:
        flag = ", allow_config_change=True" if self.allow_config_change else ""
        return f"TrainJob(cfg={self.cfg_path!r}, run_dir={self.run_dir!r}, overrides={self.overrides!r}{flag})"

    def train_overrides(self) -> list[str]:
        return [*self.overrides, f"train.run_dir={self.run_dir}"]

    def __call__(self) -> Any:
        job_env = job_environment()
        if job_env is not None:
            export_distributed_env(job_env)
        rank = int(os.environ.get("RANK", "0"))
        self._submitit_handler = signal.getsignal(signal.SIGUSR2)
        in_submitit = job_env is not None and _is_submitit_handler(self._submitit_handler)
        if in_submitit:
            # Processes forked before the trainer installs its handler (data-loader workers)
            # would inherit submitit's and requeue from a worker: only this pid may act.
            signal.signal(signal.SIGUSR2, _main_process_only(self._submitit_handler))
        if in_submitit and rank == 0:
            submissions.append_event(
                self.run_dir, submissions.STARTED, job_id=job_env.job_id, cluster=job_env.cluster,
                restart=int(os.environ.get("SLURM_RESTART_COUNT", "0")),
                nodes=os.environ.get("SLURM_JOB_NODELIST", job_env.hostname),
                world_size=int(os.environ["WORLD_SIZE"]), master=os.environ["MASTER_ADDR"])
        started = time.time()

        if in_submitit:  # a process of its own: torch's import-time objects frozen (simmatch/launch/process.py)
            preload(("torch", "torchvision"))
        module, _, name = self.entry.partition(":")
        run = getattr(importlib.import_module(module), name)  # lazily: torch is imported in the job only
        try:
            extra = {"allow_config_change": True} if self.allow_config_change else {}
            result = run(self.cfg_path, self.train_overrides(), **extra)
        except Exception as exc:
            if in_submitit and rank == 0:
                submissions.append_event(self.run_dir, submissions.FAILED, job_id=job_env.job_id,
                                         error=f"{type(exc).__name__}: {exc}"[:500])
            raise
        # A USR2 arriving from now on must not run submitit's handler behind our back.
        signal.signal(signal.SIGUSR2, self._note_late_usr2)
        self._iteration, self._signum = result.iteration, result.signum
        if not in_submitit:
            return result
        if result.status in ("finished", "already_finished"):  # a finished run ends the job: no requeue
            if rank == 0:
                submissions.append_event(self.run_dir, submissions.FINISHED, job_id=job_env.job_id,
                                         iteration=result.iteration)
            return result
        if rank != 0:
            if job_env.cluster == "slurm":
                self._wait_for_requeue(job_env.job_id, started)
            return result
        if self._should_requeue(result.signum, job_env):
            # submitit: checkpoint() -> requeue -> sys.exit; or UncompletedJobError past max_requeues
            self._submitit_handler(signal.SIGUSR2, None)
        if self._requeued_by_slurm(job_env):
            # An admin's `scontrol requeue` (or SLURM itself) sends SIGTERM alone and restarts
            # the job: the run goes on, it is not stopped.
            submissions.append_event(self.run_dir, submissions.REQUEUED, job_id=job_env.job_id,
                                     reason="requeued by SLURM (scontrol requeue)",
                                     signal=_signame(result.signum), iteration=result.iteration)
            return result
        submissions.append_event(self.run_dir, submissions.STOPPED, job_id=job_env.job_id,
                                 iteration=result.iteration, signal=_signame(result.signum),
                                 reason=self._stop_reason(job_env))
        return result

    @staticmethod
    def _requeued_by_slurm(job_env: Any) -> bool:
        """SLURM counts the restart as soon as it requeues a job (its state then reads
        COMPLETING, then PENDING): more restarts than this run of the job started with."""
        if job_env.cluster != "slurm":
            return False
        restarts = query_job(job_env.job_id).get("Restarts", "")
        return restarts.isdigit() and int(restarts) > int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)

    def _note_late_usr2(self, signum: int, frame: Any) -> None:
        self._late_usr2 = True

    def _should_requeue(self, signum: int | None, job_env: Any) -> bool:
        """USR2 (time-out warning, preemption) requeues; SIGTERM alone only inside a live job.

        The trainer reports the first signal; a preemption sends SIGTERM and USR2, a cancel
        or an external requeue only SIGTERM, and those leave the job CANCELLED/COMPLETING/...
        """
        if signum == signal.SIGUSR2 or self._late_usr2:
            return True
        if job_env.cluster != "slurm":
            return False
        state = query_job(job_env.job_id)["JobState"]
        if state == UNKNOWN:  # no answer from slurmctld: give a preemption's USR2 a moment
            deadline = time.time() + 3
            while not self._late_usr2 and time.time() < deadline:
                time.sleep(0.1)
            return self._late_usr2
        return state == "RUNNING"

    def _stop_reason(self, job_env: Any) -> str:
        if job_env.cluster != "slurm":
            return "signal outside SLURM"
        state = query_job(job_env.job_id)["JobState"]
        if state in ("CANCELLED", "COMPLETING"):  # a cancelled job reads COMPLETING until its tasks end
            return "cancelled (or ended by SLURM)"
        return f"SIGTERM without USR2, job {state}"

    def _wait_for_requeue(self, job_id: str, started: float) -> None:
        """Leave the result unwritten while rank 0 requeues; the requeue's SIGTERM ends us.

        A result file written now would be a stale 'interrupted' result for whoever waits on
        the job. We stop waiting when rank 0 logs that the run stopped instead.
        """
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        deadline = time.time() + self.WAIT_FOR_REQUEUE_S
        while time.time() < deadline:
            for e in reversed(submissions.read_events(self.run_dir)):
                if e.get("unix", 0) < started:
                    break
                if e.get("job_id") == job_id and e["event"] in (submissions.STOPPED, submissions.FAILED):
                    return
            time.sleep(1)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on rank 0 before it requeues: log the requeue, resubmit self.

        The state to resume from is already on disk (the ranks saved it together).
        """
        from submitit.helpers import DelayedSubmission

        timed_out = submitit_compat.has_timed_out(self._submitit_handler)
        left = submitit_compat.timeouts_left(self._submitit_handler, timed_out)
        job_env = job_environment()  # an array element's id is ARRAY_INDEX, as its other events say
        job_id = job_env.job_id if job_env is not None else \
            os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID", "")
        iteration = self._iteration if self._iteration is not None else \
            _newest_checkpoint_iteration(self.run_dir)
        if left is not None and left < 0:
            submissions.append_event(self.run_dir, submissions.STOPPED, job_id=job_id, iteration=iteration,
                                     reason="timed out more often than --max-requeues allows")
        else:
            submissions.append_event(self.run_dir, submissions.REQUEUED, job_id=job_id,
                                     reason="timeout" if timed_out else "preemption",
                                     signal=_signame(self._signum), iteration=iteration, timeouts_left=left)
        return DelayedSubmission(TrainJob(self.cfg_path, self.overrides, self.run_dir, self.entry,
                                          self.allow_config_change))


def _signame(signum: int | None) -> str | None:
    if signum is None:
        return None
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
