#!/usr/bin/env python
"""Run a grid of trainings: one run directory per point of the grid and per seed.

  python tools/sweep.py --cfg yaml/digits.yaml --grid method.temperature=0.05,0.1 \\
      --grid method.alpha=0.7,0.9 --seeds 0,1 --out runs/fig5 [--local | --nodes N] [key=value ...]

Each point trains in DIR/<key>=<value>,.../s<seed> (`--grid cfg=A.yaml,B.yaml` varies the config
file: the directory shows its stem); the trailing overrides apply to every point ({seed} and
{sweep} in them become the point's seed and DIR). DIR/sweep.json records the sweep. Given again,
the same command trains only the points that are not finished, and says which it skips;
another grid in the same DIR is refused.
On SLURM (--nodes N, or wherever sbatch is found without --local) the points are one job array,
each element an ordinary job of its own run directory that requeues on preemption or time-out
and resumes; --parallel K runs at most K elements at once; every point passes the pre-flight
check (tools/train.py --check) before anything is submitted. With --local they train here one
after another (--nproc N processes each). Follow it with `python tools/status.py DIR`; then
`python tools/summarize.py DIR` and `python tools/plot.py DIR --x KEY`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from simmatch.errors import cli_errors  # noqa: E402
from simmatch.run.sweep import (  # noqa: E402
    Point,
    Sweep,
    SweepError,
    open_sweep,
    parse_grid,
    parse_seeds,
    run_finished,
    save_sweep,
    validate,
)
from slurm import submissions  # noqa: E402
from slurm.jobstate import is_ended, job_state  # noqa: E402
from slurm.options import add_job_options, job_spec  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", default="", help="YAML config of every point (unless the grid has cfg=...)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a config key and its values (repeat for a product of several keys)")
    p.add_argument("--seeds", default="0", help="train.seed of each point, e.g. 0,1,2 (default 0)")
    p.add_argument("--out", help="the sweep's directory (default: runs/sweeps/<config name>)")
    p.add_argument("--parallel", type=int, default=0, help="SLURM: at most K array elements at once (0: all)")
    p.add_argument("--nproc", type=int, default=0, help="--local: processes per point (tools/train.py --nproc)")
    p.add_argument("--skip-check", action="store_true", help="SLURM: submit without the pre-flight checks")
    p.add_argument("--dry-run", action="store_true", help="list the points and what would run; run nothing")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="train the points here, one after another")
    where.add_argument("--slurm", action="store_true", help="submit to SLURM; fail when there is none")
    add_job_options(p, resume_note="")
    p.add_argument("overrides", nargs="*", help="key=value overrides of every point")
    args = p.parse_intermixed_args(argv)
    if args.local and args.nodes:
        raise SweepError("--local trains here: --nodes is for SLURM")
    if args.parallel < 0 or args.nproc < 0:
        raise SweepError("--parallel and --nproc are 0 or more")
    return args


def build(args: argparse.Namespace) -> tuple[Sweep, Path]:
    from simmatch.config import parse_override

    for text in args.overrides:
        parse_override(text)
    sweep = Sweep(cfg=args.cfg, grid=parse_grid(args.grid), seeds=parse_seeds(args.seeds),
                  overrides=list(args.overrides))
    stem = Path(args.cfg).stem if args.cfg else "grid"
    root = Path(args.out or Path("runs") / "sweeps" / stem).resolve()
    validate(sweep)
    from simmatch.config import load_config

    for point in sweep.points()[::len(sweep.seeds)]:  # a bad key or value fails here, before anything runs
        load_config(sweep.cfg_of(point), sweep.train_overrides(point, root))
    return sweep, root


def live_job(root: Path, point: Point) -> str | None:
    """'job J is STATE' when the point's newest SLURM job has not ended (it trains, or waits to), or
    when scontrol cannot say (a job submitted twice would train the run twice at once)."""
    job_id = submissions.last_job_id(submissions.read_events(root / point.rel))
    if job_id is None:
        return None
    state = job_state(job_id)
    if state == "UNKNOWN":
        return f"job {job_id}: scontrol did not answer, so it may still run"
    return None if is_ended(state) else f"job {job_id} is {state}"


def preflight(sweep: Sweep, root: Path, points: list[Point], world_size: int) -> None:
    """tools/train.py --check of every point at the job's world size; nothing is submitted unless
    every point passes."""
    from simmatch.config import load_config
    from simmatch.launch.preflight import check_line, run_checks
    from simmatch.run.rundir import RunDir
    from slurm.launcher import LaunchError

    failed = []
    for point in points:
        cfg = load_config(sweep.cfg_of(point), sweep.train_overrides(point, root))
        bad = [c for c in run_checks(cfg, RunDir(root / point.rel), world_size) if not c.ok]
        print(f"pre-flight {point.rel}: " + ("ok" if not bad else check_line(bad[0])), flush=True)
        if bad:
            failed.append(f"{point.rel}: {check_line(bad[0]).split(None, 1)[1]}")
    if failed:
        raise LaunchError(f"pre-flight check failed for {len(failed)} point(s), nothing submitted: {failed[0]}")


def submit_points(args: argparse.Namespace, sweep: Sweep, root: Path, points: list[Point]) -> int:
    from simmatch.config import derive_scale, load_config
    from slurm.launcher import TrainJob, sbatch_script, submit_array, submitit_folder

    cfg = load_config(sweep.cfg_of(points[0]), sweep.train_overrides(points[0], root))
    for key in ("nodes", "gpus_per_node"):
        if getattr(args, key) is None:
            setattr(args, key, 1 if key == "nodes" else 8)
    spec = job_spec(args, f"sweep-{root.name}")
    derive_scale(cfg, spec.world_size)
    if args.dry_run:
        print(sbatch_script(spec, root), end="")
        return 0
    if not args.skip_check:
        preflight(sweep, root, points, spec.world_size)
    jobs = [TrainJob(str(Path(sweep.cfg_of(p)).resolve()), sweep.train_overrides(p, root)[:-1], str(root / p.rel))
            for p in points]
    ids = submit_array(jobs, spec, submitit_folder(root), args.parallel or None, sweep=str(root))
    sweep.submissions.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "nodes": spec.nodes,
                              "tasks_per_node": spec.ntasks_per_node,
                              "jobs": {p.rel: job_id for p, job_id in zip(points, ids)}})
    save_sweep(root, sweep)
    kind = f"job array {ids[0].split('_')[0]}" if "_" in ids[0] else f"job {ids[0]}"
    print(f"submitted {kind}: {len(ids)} point(s) x {spec.nodes} node(s) x {spec.ntasks_per_node} task(s)"
          + (f", at most {args.parallel} at once" if args.parallel else ""))
    print(f"follow it:  python tools/status.py {root}")
    print(json.dumps({"sweep": str(root), "submitted": dict(zip((p.rel for p in points), ids))}))
    return 0


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wanted, root = build(args)
    sweep = open_sweep(root, wanted) if not args.dry_run else wanted
    points = sweep.points()
    done = [p for p in points if run_finished(root / p.rel)]
    todo = [p for p in points if p not in done]
    print(f"sweep {root}: {len(points)} run(s), {len(done)} finished, {len(todo)} to train")
    if done:
        print("finished, not trained again: " + ", ".join(p.rel for p in done))
    use_slurm = args.slurm or args.nodes is not None or (not args.local and shutil.which("sbatch") is not None)
    if use_slurm and not shutil.which("sbatch") and not args.dry_run:
        raise SweepError("--nodes/--slurm: no SLURM here (no sbatch on PATH); --local trains here")
    if use_slurm:
        live = {p.rel: why for p in todo if (why := live_job(root, p))}
        for rel, why in live.items():
            print(f"{rel}: {why}, not submitted again")
        todo = [p for p in todo if p.rel not in live]
    if todo:
        print("to train: " + ", ".join(p.rel for p in todo), flush=True)
    if not todo:
        print(json.dumps({"sweep": str(root), "finished": len(done), "trained": 0}))
        return 0
    if use_slurm:
        return submit_points(args, sweep, root, todo)
    if args.dry_run:
        return 0
    from simmatch.launch.sweep_local import run_local

    left = run_local(sweep, root, todo, args.nproc)
    print(json.dumps({"sweep": str(root), "finished": len(points) - len(left), "trained": len(todo) - len(left),
                      "unfinished": [p.rel for p in left]}))
    return 1 if left else 0


if __name__ == "__main__":
    from simmatch.launch.process import run_cli

    run_cli(main)
