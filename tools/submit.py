#!/usr/bin/env python
"""Submit a training run to SLURM (requeued on preemption/time-out, resumed from checkpoints).

  python tools/submit.py --nodes 4 --cfg yaml/in1k_1pct.yaml [key=value ...]
  python tools/submit.py --cfg yaml/digits.yaml --gpus-per-node 0 --tasks-per-node 2 --nodes 2 ...
  python tools/submit.py --resume RUN_DIR            # continue a stopped or cancelled run
  python tools/submit.py --resume RUN_DIR --nodes 1  # ... on another number of nodes (elastic resume)
  python tools/submit.py ... --dry-run               # print the sbatch script and the recipe, submit nothing
  python tools/submit.py --nodes 1 --gpus-per-node 2 --cfg yaml/in1k_1pct.yaml train.virtual_world_size=8
                                                     # the 8-GPU run on 2 GPUs: 4 virtual ranks per task

Without SLURM (no sbatch on PATH) the run starts locally unless --slurm is given.
Follow a run with `python tools/status.py RUN_DIR`. See docs/SLURM.md.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from simmatch.config import derive_scale, load_config, parse_override  # noqa: E402
from simmatch.errors import cli_errors  # noqa: E402
from simmatch.launch.preflight import FINISHED  # noqa: E402
from simmatch.launch.recipe import recipe_lines  # noqa: E402
from simmatch.run.rundir import RunDir  # noqa: E402
from slurm import submissions  # noqa: E402
from slurm.jobstate import is_ended, job_state  # noqa: E402
from slurm.launcher import JobSpec, LaunchError, TrainJob, sbatch_script, submit  # noqa: E402
from slurm.options import add_job_options, job_spec  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", help="YAML config, e.g. yaml/in1k_1pct.yaml")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its saved config.yaml")
    add_job_options(p)
    p.add_argument("--run-dir", help="default: <output root>/<config name>")
    p.add_argument("--output-root", help="shared directory for runs (default: $SIMMATCH_OUTPUT_ROOT "
                                         "or the config's train.output_root)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: continue the run with another schedule length (optim.iters / "
                        "optim.epochs given as overrides); judged by the pre-flight check and passed to the job")
    p.add_argument("--skip-check", action="store_true",
                   help="submit without the pre-flight checks (tools/train.py --check) of data and run directory")
    p.add_argument("--dry-run", action="store_true",
                   help="print the sbatch script and the derived recipe (last line: JSON) and exit")
    p.add_argument("--selftest", action="store_true",
                   help="instead of training: one short job running tools/selftest.py on every task "
                        "of the requested nodes (20 min limit unless --timeout); prints its report")
    p.add_argument("--selftest-args", default="", metavar="'ARGS'",
                   help="with --selftest: options of tools/selftest.py, e.g. '--data /datasets/imagenet'")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="run on this machine, in the foreground")
    where.add_argument("--slurm", action="store_true", help="submit to SLURM; fail when there is none")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. optim.epochs=100")
    return p.parse_args(argv)


def _resume_source(run_dir: Path) -> tuple[str, list[str]]:
    """Config file and overrides of the run in `run_dir`: its saved config, else its submission."""
    rd = RunDir(run_dir)
    if rd.saved_config() is not None:  # checked: a damaged config.yaml is one line naming it
        return str(rd.config), []
    for e in reversed(submissions.read_events(run_dir)):
        if e["event"] == submissions.SUBMITTED:
            return e.get("cfg"), list(e.get("overrides") or [])
    raise LaunchError(f"--resume {run_dir}: no config.yaml and no submission in that directory")


def _job_shape(args: argparse.Namespace) -> None:
    """--nodes / --gpus-per-node / --tasks-per-node not given: a resumed run's own job shape
    (its last submission), else 1 node x 8 GPUs. Those given win: `--resume RUN --nodes 1`
    keeps the run's tasks per node on one node (an elastic resume, judged by the pre-flight)."""
    shape = {}
    if args.resume:
        for e in reversed(submissions.read_events(Path(args.resume))):
            if e["event"] == submissions.SUBMITTED and "nodes" in e:
                shape = {"nodes": e["nodes"], "gpus_per_node": e.get("gpus_per_node", 8),
                         "tasks_per_node": None if e.get("gpus_per_node", 8) else e.get("tasks_per_node")}
                break
    inherited = set()
    for key, default in (("nodes", 1), ("gpus_per_node", 8), ("tasks_per_node", None)):
        if getattr(args, key) is None:
            setattr(args, key, shape.get(key, default))
            inherited.add(key)
    if "tasks_per_node" in inherited and args.gpus_per_node > 0:
        args.tasks_per_node = None  # GPU tasks: one per GPU, whatever CPU tasks the run had before


def _preflight(args: argparse.Namespace, job: TrainJob, spec: JobSpec) -> None:
    """Before sbatch: the partition can hold the job, and `tools/train.py --check` passes
    (config, data tree, images, run directory, resume world size) at the job's world size."""
    import subprocess

    from slurm.cluster import check_fits, partition_info

    part = partition_info(spec.partition)
    if part is not None:
        print(check_fits(part, spec.nodes, spec.ntasks_per_node, spec.cpus_per_task, spec.gpus_per_node),
              flush=True)
    if args.skip_check:
        return
    train = Path(__file__).resolve().parent / "train.py"
    cmd = [sys.executable, str(train), "--cfg", job.cfg_path, "--check", "--world-size", str(spec.world_size),
           *(["--allow-config-change"] if args.allow_config_change else []),
           *job.train_overrides()]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(proc.stdout, end="", flush=True)
    if proc.returncode == 0 and FINISHED in proc.stdout:
        raise LaunchError(f"{job.run_dir}: {FINISHED}, nothing submitted (to train longer, raise optim.epochs "
                          f"or optim.iters with --allow-config-change)")
    if proc.returncode != 0:
        detail = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith(("FAIL", "error"))]
        raise LaunchError(f"pre-flight check failed, nothing submitted: {(detail or ['see above'])[0]}")


def _run_dir(args: argparse.Namespace, cfg) -> Path:
    if args.resume:
        return Path(args.resume).resolve()
    if args.run_dir:
        return Path(args.run_dir).resolve()
    if cfg.train.run_dir:
        return Path(cfg.train.run_dir).resolve()
    root = args.output_root or os.environ.get("SIMMATCH_OUTPUT_ROOT") or cfg.train.output_root
    return (Path(root) / (cfg.name or "run")).resolve()


def _check_run_dir(run_dir: Path, resuming: bool) -> None:
    """Never start a second run over an existing one, nor resume a run whose job still lives."""
    if not resuming and RunDir(run_dir).holds_run():
        raise LaunchError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, "
                          "or choose another --run-dir")
    job_id = submissions.last_job_id(submissions.read_events(run_dir))
    if job_id and shutil.which("scontrol"):
        state = job_state(job_id)
        if not is_ended(state) and state != "UNKNOWN":
            raise LaunchError(f"job {job_id} of {run_dir} is still {state}: scancel {job_id} first")


def _spec(args: argparse.Namespace, cfg) -> JobSpec:
    spec = job_spec(args, f"simmatch-{cfg.name or 'run'}")
    # batch per task, BN groups and virtual ranks (train.virtual_world_size a multiple of the
    # tasks), refused in one line before any job exists
    derive_scale(cfg, spec.world_size)
    return spec


def _local_tasks(spec: JobSpec) -> int:
    if spec.gpus_per_node > 0:
        import torch

        gpus = torch.cuda.device_count()
        if gpus:
            return min(gpus, spec.gpus_per_node)
    return spec.tasks_per_node or 1


def run_local(job: TrainJob, spec: JobSpec, note: str, cfg=None) -> int:
    """Train on this machine in the foreground: in this process, or one process per task. With
    virtual ranks the local processes must divide them too: checked before anything starts."""
    tasks = _local_tasks(spec)
    extra = f"; --nodes {spec.nodes} ignored" if spec.nodes > 1 else ""
    ranks = ""
    if cfg is not None:
        s = derive_scale(cfg, tasks)
        ranks = f" running {s.world_size} virtual ranks" if s.virtual_world_size else ""
    print(f"{note}running locally: {tasks} process(es){ranks}{extra}; run directory {job.run_dir}", flush=True)
    if tasks == 1:
        result = job()
        print(f"{result.status} at iteration {result.iteration}")
        return 0
    from simmatch.launch.local import launch

    return launch(job.cfg_path, job.train_overrides(), tasks,
                  ["--allow-config-change"] if job.allow_config_change else [])


def _selftest(args: argparse.Namespace) -> int:
    """--selftest: the job's resources as for training, no config, a short time limit."""
    from slurm.selftest_job import run_selftest, selftest_folder

    cpus = args.cpus_per_task if args.cpus_per_task is not None else (10 if args.gpus_per_node > 0 else None)
    spec = JobSpec(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                   cpus_per_task=cpus, mem=args.mem, partition=args.partition, account=args.account,
                   qos=args.qos, constraint=args.constraint,
                   timeout_min=20 if args.timeout == 1440 else args.timeout,
                   job_name=args.job_name or "simmatch-selftest", signal_delay_s=0, max_requeues=0)
    spec.validate()
    root = args.output_root or os.environ.get("SIMMATCH_OUTPUT_ROOT") or "runs"
    return run_selftest(spec, selftest_folder(root), shlex.split(args.selftest_args),
                        dry_run=args.dry_run, local=args.local, require_slurm=args.slurm)


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _job_shape(args)
    if args.selftest:
        return _selftest(args)
    if bool(args.cfg) == bool(args.resume):
        raise LaunchError("give either --cfg CONFIG or --resume RUN_DIR")
    for text in args.overrides:
        parse_override(text)
    if args.resume:
        if not Path(args.resume).is_dir():
            raise LaunchError(f"--resume {args.resume}: no such directory")
        cfg_path, overrides = _resume_source(Path(args.resume))
        overrides += args.overrides
    else:
        cfg_path, overrides = args.cfg, list(args.overrides)
    cfg = load_config(cfg_path, overrides)  # a bad key or value fails here, before any job exists
    run_dir = _run_dir(args, cfg)
    overrides = [o for o in overrides if parse_override(o)[0] != "train.run_dir"]
    job = TrainJob(str(Path(cfg_path).resolve()) if cfg_path else None, overrides, str(run_dir),
                   allow_config_change=args.allow_config_change)
    spec = _spec(args, cfg)
    if args.dry_run:
        print(sbatch_script(spec, run_dir), end="")
        print("\n" + "\n".join(recipe_lines(cfg, spec.world_size)))
        return 0
    has_slurm = shutil.which("sbatch") is not None
    if args.slurm and not has_slurm:
        raise LaunchError("--slurm: no SLURM here (no sbatch on PATH)")
    _check_run_dir(run_dir, bool(args.resume))
    if args.local or not has_slurm:
        note = "" if args.local else "no SLURM found (no sbatch on PATH): "
        return run_local(job, spec, note, cfg)
    _preflight(args, job, spec)
    sjob = submit(job, spec)
    print(f"submitted job {sjob.job_id}: {spec.nodes} node(s) x {spec.ntasks_per_node} task(s), "
          f"{spec.timeout_min} min per job, up to {spec.max_requeues} time-out requeues")
    print(f"run directory: {run_dir}")
    print(f"logs:          {sjob.paths.stdout} (.err beside it; one pair per task)")
    print(f"follow it:     python tools/status.py {run_dir}")
    return 0


if __name__ == "__main__":
    from simmatch.launch.process import run_cli

    run_cli(main)
