"""The submitted self-test: every task of the job runs simmatch.selftest as one rank.

Like TrainJob it pickles a few strings and imports torch only inside the job. Each task
returns (exit code, report lines); the report is the same on every rank (merged there).
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

from slurm.job import export_distributed_env, job_environment


class SelftestJob:
    """`simmatch.selftest.run(args)` on every rank of the job."""

    def __init__(self, args: list[str]) -> None:
        self.args = list(args)

    def __repr__(self) -> str:
        return f"SelftestJob(args={self.args!r})"

    def __call__(self) -> tuple[int, list[str]]:
        job_env = job_environment()
        if job_env is not None:
            export_distributed_env(job_env)
        from simmatch.selftest.runner import run  # torch is imported in the job only

        return run(self.args)

    def checkpoint(self, *args: Any, **kwargs: Any) -> None:
        """A self-test is short: a preempted one is not requeued, it is run again by hand."""
        return None


def selftest_folder(output_root: str) -> Path:
    """Where the job's submitit pickles and per-task logs go (shared storage, like runs)."""
    return Path(output_root).resolve() / "selftest" / time.strftime("%Y%m%d-%H%M%S")


def run_selftest(spec: Any, folder: Path, args: list[str], *, dry_run: bool, local: bool,
                 require_slurm: bool) -> int:
    """Submit one self-test job with `spec`'s nodes and tasks and print its report (waits for
    it); print the sbatch script with `dry_run`; run on this machine without SLURM."""
    from simmatch.selftest.cli import parse_args
    from slurm.launcher import LaunchError, make_executor, sbatch_script, submitit_folder

    parse_args(args)  # a wrong option fails here, before any job exists
    if dry_run:
        print(sbatch_script(spec, folder), end="")
        return 0
    has_slurm = shutil.which("sbatch") is not None
    if require_slurm and not has_slurm:
        raise LaunchError("--slurm: no SLURM here (no sbatch on PATH)")
    if local or not has_slurm:
        tasks = spec.ntasks_per_node
        if spec.gpus_per_node > 0:
            import torch

            tasks = min(torch.cuda.device_count(), spec.gpus_per_node) or 1
        note = "" if local else "no SLURM found (no sbatch on PATH): "
        print(f"{note}self-test on this machine: {tasks} process(es)", flush=True)
        from simmatch.launch.local import spawn

        return spawn([sys.executable, "-m", "simmatch.selftest", *args], tasks)
    from submitit.core.utils import FailedJobError, FailedSubmissionError, UncompletedJobError

    ex = make_executor(spec, submitit_folder(folder))
    try:
        job = ex.submit(SelftestJob(args))
    except (FailedJobError, FailedSubmissionError) as exc:
        raise LaunchError(f"sbatch refused the self-test job: {str(exc).strip().splitlines()[-1][:300]}") from None
    print(f"submitted self-test job {job.job_id}: {spec.nodes} node(s) x {spec.ntasks_per_node} task(s); "
          f"waiting for it (logs: {job.paths.stdout})", flush=True)
    try:
        results = job.results()
    except (FailedJobError, UncompletedJobError) as exc:
        print(f"FAIL  job              self-test job {job.job_id} did not finish: "
              f"{(str(exc).strip().splitlines() or [''])[-1][:400]}  [fix: read {job.paths.stderr}]")
        return 1
    code, lines = results[0]
    print("\n".join(lines))
    return max([code] + [r[0] for r in results])
