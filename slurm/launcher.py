"""Submit training to SLURM with submitit: the job's resources, the sbatch script, submission.

The pickled callable (`slurm.job.TrainJob`) holds a few strings and imports the training
code only inside the job, so submitting never imports torch or touches CUDA. How a job
requeues itself and resumes is described in slurm/job.py and docs/SLURM.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simmatch.errors import UserError
from slurm import submissions, submitit_compat
from slurm.job import TrainJob
from slurm.jobstate import ScontrolSlurmJob

__all__ = ["JobSpec", "LaunchError", "TrainJob", "load_job", "make_executor", "sbatch_script", "submit",
           "submit_array", "submitit_folder"]


class LaunchError(UserError):
    """Bad launcher input or a submission that SLURM refused: one line, exit 2."""


@dataclass
class JobSpec:
    """What to ask SLURM for; one task per GPU (or `tasks_per_node` CPU tasks without GPUs)."""

    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int | None = None  # default: gpus_per_node, or 1 without GPUs
    cpus_per_task: int | None = None
    mem: str | None = None  # per node, SLURM syntax: 64G, 500000M, 0 (all)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    timeout_min: int = 1440
    job_name: str = "simmatch"
    signal_delay_s: int = 90
    max_requeues: int = 10  # time-outs (submitit's max_num_timeout); preemptions are unlimited

    @property
    def ntasks_per_node(self) -> int:
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    def validate(self) -> None:
        for name in ("nodes", "timeout_min"):
            if getattr(self, name) < 1:
                raise LaunchError(f"--{name.replace('_min', '').replace('_', '-')} must be at least 1, "
                                  f"got {getattr(self, name)}")
        if self.gpus_per_node < 0:
            raise LaunchError(f"--gpus-per-node must be 0 or more, got {self.gpus_per_node}")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise LaunchError(f"--tasks-per-node must be at least 1, got {self.tasks_per_node}")
        if self.gpus_per_node > 0 and self.tasks_per_node not in (None, self.gpus_per_node):
            raise LaunchError(f"one task per GPU: --tasks-per-node {self.tasks_per_node} differs from "
                              f"--gpus-per-node {self.gpus_per_node} (use --gpus-per-node 0 for CPU tasks)")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise LaunchError(f"--cpus-per-task must be at least 1, got {self.cpus_per_task}")
        if self.max_requeues < 0:
            raise LaunchError(f"--max-requeues must be 0 or more, got {self.max_requeues}")
        if not 0 <= self.signal_delay_s < self.timeout_min * 60:
            raise LaunchError(f"--signal-delay {self.signal_delay_s} s must lie in [0, --timeout "
                              f"{self.timeout_min} min)")
        if self.mem is not None and not _valid_mem(self.mem):
            raise LaunchError(f"--mem {self.mem!r} is not a SLURM memory size such as 64G, 500M or 0")

    def slurm_parameters(self) -> dict[str, Any]:
        """SlurmExecutor parameters (sbatch names)."""
        params: dict[str, Any] = {
            "job_name": self.job_name, "nodes": self.nodes, "ntasks_per_node": self.ntasks_per_node,
            "time": self.timeout_min, "signal_delay_s": self.signal_delay_s,
            # explicit, so that scontrol requeue works where the cluster's JobRequeue is 0
            "additional_parameters": {"requeue": True},
            # a crashed rank ends the step at once instead of leaving the others in a collective
            "srun_args": ["--kill-on-bad-exit=1"],
        }
        if self.gpus_per_node > 0:
            params["gpus_per_node"] = self.gpus_per_node
        optional = {"cpus_per_task": self.cpus_per_task, "mem": self.mem, "partition": self.partition,
                    "account": self.account, "qos": self.qos, "constraint": self.constraint}
        params.update({k: v for k, v in optional.items() if v is not None})
        return params


def _valid_mem(text: str) -> bool:
    digits = text[:-1] if text[-1:].upper() in ("K", "M", "G", "T") else text
    return digits.isdigit()


def _executor_classes() -> tuple[type, type]:
    from submitit import SlurmExecutor

    class Executor(SlurmExecutor):
        """SlurmExecutor whose jobs read their state from scontrol (no accounting needed)."""

        job_class = ScontrolSlurmJob

    class DryRunExecutor(Executor):
        """Builds the same sbatch script where no SLURM is installed."""

        @classmethod
        def affinity(cls) -> int:
            return 1

    return Executor, DryRunExecutor


def make_executor(spec: JobSpec, folder: str | Path, dry_run: bool = False) -> Any:
    spec.validate()
    executor_cls, dry_cls = _executor_classes()
    ex = (dry_cls if dry_run else executor_cls)(folder=folder, max_num_timeout=spec.max_requeues)
    ex.update_parameters(**spec.slurm_parameters())
    return ex


def submitit_folder(run_dir: str | Path) -> Path:
    """Where submitit keeps pickles and the per-task logs (%j_%t_log.out/err)."""
    return Path(run_dir) / "slurm"


def sbatch_script(spec: JobSpec, run_dir: str | Path) -> str:
    """The exact sbatch script a submission would write (log paths still hold %j)."""
    ex = make_executor(spec, submitit_folder(run_dir), dry_run=True)
    return submitit_compat.submission_script(ex)


def _refused(exc: Exception, what: str) -> LaunchError:
    """sbatch's refusal (submitit's error) as one line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if "error" in ln or "fatal" in ln]
    return LaunchError(f"sbatch refused the {what}: {(lines or [str(exc)])[-1][:300]}")


def _log_submitted(job: TrainJob, spec: JobSpec, job_id: str, folder: Path, **extra: Any) -> None:
    submissions.append_event(job.run_dir, submissions.SUBMITTED, job_id=job_id, nodes=spec.nodes,
                             tasks_per_node=spec.ntasks_per_node, gpus_per_node=spec.gpus_per_node,
                             timeout_min=spec.timeout_min, max_requeues=spec.max_requeues,
                             cfg=job.cfg_path, overrides=job.overrides, folder=str(folder), **extra)


def submit(job: TrainJob, spec: JobSpec) -> ScontrolSlurmJob:
    """Submit to SLURM and log the submission in the run directory."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    ex = make_executor(spec, submitit_folder(job.run_dir))
    try:
        sjob = ex.submit(job)
    except (FailedJobError, FailedSubmissionError) as exc:
        raise _refused(exc, "job") from None
    _log_submitted(job, spec, sjob.job_id, ex.folder)
    return sjob


def submit_array(jobs: list[TrainJob], spec: JobSpec, folder: str | Path, parallel: int | None = None,
                 sweep: str | None = None) -> list[str]:
    """Submit `jobs` as one SLURM job array (at most `parallel` elements running at once), each
    element an ordinary requeueing job of its own run directory; one job alone is submitted as a
    plain job (submitit's rule). The submission is logged in each run directory, with `folder`
    (where the array's pickles and logs are) and the `sweep` it belongs to. Returns the job ids
    (ARRAY_INDEX for array elements)."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    ex = make_executor(spec, folder)
    if parallel:
        ex.update_parameters(array_parallelism=parallel)
    try:
        handles = ex.submit_array(jobs)
    except (FailedJobError, FailedSubmissionError) as exc:
        raise _refused(exc, "job array") from None
    ids = [str(h.job_id) for h in handles]
    for job, job_id in zip(jobs, ids):
        _log_submitted(job, spec, job_id, ex.folder, **({"sweep": sweep} if sweep else {}))
    return ids


def load_job(run_dir: str | Path, job_id: str, num_tasks: int) -> ScontrolSlurmJob:
    """A handle on a submitted job (state, results, _interrupt) from its id; the submitit folder
    is the one its submission logged (a sweep's array keeps one for all its runs)."""
    folder = next((e.get("folder") for e in reversed(submissions.read_events(run_dir))
                   if e["event"] == submissions.SUBMITTED and str(e.get("job_id")) == str(job_id)
                   and e.get("folder")), None)
    return ScontrolSlurmJob(folder=folder or submitit_folder(run_dir), job_id=str(job_id),
                            tasks=list(range(num_tasks)))
