"""The job's resources as command-line options, shared by tools/submit.py and tools/sweep.py:
the same flags, defaults and checks whether one run or a job array is submitted."""
from __future__ import annotations

import argparse

from slurm.launcher import JobSpec


def add_job_options(p: argparse.ArgumentParser, resume_note: str = " (with --resume: the run's own)") -> None:
    """--nodes ... --max-requeues. `resume_note` ends the help of the options a resumed run inherits."""
    p.add_argument("--nodes", type=int, help=f"default 1{resume_note}")
    p.add_argument("--gpus-per-node", type=int, help=f"one task per GPU (0: CPU tasks); default 8{resume_note}")
    p.add_argument("--tasks-per-node", type=int, help=f"tasks per node without GPUs (default 1{resume_note})")
    p.add_argument("--cpus-per-task", type=int, help="default: 10 with GPUs, else the cluster's default")
    p.add_argument("--mem", help="memory per node: 64G, 500000M, 0 = all (default: the cluster's)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--timeout", type=int, default=1440, help="time limit of each job, minutes")
    p.add_argument("--job-name", help="default: simmatch-<config name>")
    p.add_argument("--signal-delay", type=int, default=90,
                   help="seconds between USR2 and the time limit (the checkpoint's time budget)")
    p.add_argument("--max-requeues", type=int, default=10,
                   help="requeues after a time-out (preemptions requeue without limit)")


def job_spec(args: argparse.Namespace, default_name: str) -> JobSpec:
    """The JobSpec the options ask for (10 CPUs per GPU task unless --cpus-per-task), checked."""
    cpus = args.cpus_per_task
    if cpus is None and args.gpus_per_node > 0:
        cpus = 10
    spec = JobSpec(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                   cpus_per_task=cpus, mem=args.mem, partition=args.partition, account=args.account,
                   qos=args.qos, constraint=args.constraint, timeout_min=args.timeout,
                   job_name=args.job_name or default_name, signal_delay_s=args.signal_delay,
                   max_requeues=args.max_requeues)
    spec.validate()
    return spec
