"""`tools/train.py --check`: everything a run needs, checked without training.

The checks a job would otherwise fail on minutes (or a queue wait) after it starts: config
values, the data tree (exists, class count, val classes, split lists resolve, a sample of
train and every val and labeled image decode), the run directory (writable, not held by
another writer, a saved config this run may resume with, and what resuming its newest
checkpoint with the job's processes changes: nothing when they run the checkpoint's ranks, as
processes or virtual ranks (train.virtual_world_size); else batch, lr, iteration).
`tools/submit.py` runs it before sbatch, so a job that would fail at start is refused before
the queue wait. Each check is one printed line.
"""
from __future__ import annotations

import dataclasses
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

from simmatch.checks import FAIL, PASS, Check
from simmatch.config import Config, derive_at, derive_scale, intervals_text, run_world_size, to_dict
from simmatch.errors import UserError
from simmatch.run.change import judge, judge_checkpoint
from simmatch.run.lock import holder
from simmatch.run.rundir import RunDir
from simmatch.run.world_sizes import processes_text, ranks_text
from simmatch.shards.formats import data_format

TRAIN_SAMPLE = 500  # training images decoded (the val set and the labeled list are decoded whole)
FINISHED = "the run is finished"  # the resume check's words for a run with nothing left to train


def check_line(check: Check) -> str:
    """The pre-flight's form of a check: `ok    name: reason` or `FAIL  name: reason`."""
    return f"{'ok  ' if check.ok else 'FAIL'}  {check.name}: {check.reason}"


def _run(name: str, fn: Callable[[], str]) -> Check:
    try:
        return Check(name, PASS, fn())
    except UserError as exc:
        return Check(name, FAIL, str(exc))


def lock_holder(run_dir: Path | RunDir) -> str | None:
    """Who holds RUN_DIR/.lock now ('pid P on HOST'), else None: the training's own test
    (run/lock.py), an flock that the kernel drops when its holder dies, so a stale lock file
    naming a dead (or recycled) pid never blocks a run."""
    who = holder(run_dir)
    return f"{RunDir(run_dir).lock}: {who}" if who else None


def run_checks(cfg: Config, run_dir: Path | RunDir, world_size: int | None = None,
               allow_config_change: bool = False, full: bool = False) -> list[Check]:
    """Every check, in order; a failed one does not stop the others (all are reported). `full`:
    every training image is decoded (one thread per core, a progress line), not a sample."""
    from simmatch.data.splits import load_splits
    from simmatch.images.decode import Progress, decode_all, find_undecodable, raise_if_undecodable

    rd = RunDir(run_dir)
    checks = [Check("config values", PASS, f"{cfg.name or 'config'}: every key in its range")]
    if world_size is not None:
        checks.append(_run("batch at the world size",
                           lambda: _scale(cfg, world_size)))
    resuming = rd.has_checkpoints()
    splits = None
    if cfg.data.backend == "synthetic":
        checks.append(Check("data", PASS, "synthetic backend: no files"))
    else:
        def tree() -> str:
            nonlocal splits
            splits = load_splits(cfg.data, frozen=rd.splits if resuming else None)
            return (f"{data_format(cfg.data).path}: {len(splits.classes)} classes, {len(splits.labeled_files)} "
                    f"labeled ({splits.labeled_source}), {len(splits.unlabeled_files)} unlabeled, "
                    f"{len(splits.val_files)} val images")
        checks.append(_run("data tree and split lists", tree))
    fmt = data_format(cfg.data)
    if splits is not None and full and fmt.full_check_name:  # every byte of the storage: not at each submission
        checks.append(_run(fmt.full_check_name, lambda: fmt.full_check(splits)))
    if splits is not None and full:
        def decode_every() -> str:
            started = time.perf_counter()
            train_src, val_src = splits.train_source, splits.val_source
            train = list(dict.fromkeys(splits.labeled_files + splits.unlabeled_files))
            workers = os.cpu_count() or 1
            progress = Progress(len(train) + len(splits.val_files))
            bad = [(train_src.where(f), r) for f, r in decode_all(train_src, train, workers, progress=progress)]
            bad += [(val_src.where(f), r)
                    for f, r in decode_all(val_src, splits.val_files, workers, progress=progress)]
            seconds = time.perf_counter() - started
            raise_if_undecodable(bad, "images", show=0)  # each named
            total = len(train) + len(splits.val_files)
            return (f"{total:,} images decode (every training and val image, {workers} threads) in "
                    f"{seconds:.1f} s, {total / max(seconds, 1e-9):,.0f} images/s")
        checks.append(_run("images decode (--full)", decode_every))
    elif splits is not None:
        def decode() -> str:
            started = time.perf_counter()
            sample = random.Random(0).sample(splits.unlabeled_files,
                                             min(TRAIN_SAMPLE, len(splits.unlabeled_files)))
            files = ([(splits.val_source, f) for f in splits.val_files]
                     + [(splits.train_source, f) for f in splits.labeled_files + sample])
            raise_if_undecodable(find_undecodable(files, max(4, os.cpu_count() or 1)), "images")
            return (f"{len(files)} images decode (every val and labeled image, {len(sample)} "
                    f"sampled training images) in {time.perf_counter() - started:.1f} s")
        checks.append(_run("images decode", decode))
    if splits is not None or cfg.data.backend == "synthetic":
        checks.append(_run("intervals", lambda: _intervals(cfg, world_size, splits)))
    checks.append(_run("run directory", lambda: _run_dir(rd)))
    if resuming:
        counts = (len(splits.labeled_files), len(splits.unlabeled_files)) if splits is not None else None
        checks.append(_run("resume", lambda: _resume(cfg, rd, world_size, allow_config_change, counts)))
    return checks


def _intervals(cfg: Config, world_size: int | None, splits) -> str:
    """The log, checkpoint and evaluation intervals in iterations of this run (re-scaled from the
    reference batch and clamped to the run's length, each clamp said)."""
    from simmatch.config import derive

    counts = ((len(splits.labeled_files), len(splits.unlabeled_files)) if splits is not None
              else (cfg.data.synthetic_size,) * 2)
    d = derive(cfg, world_size or 1, *counts)
    where = f"at {processes_text(world_size)}" if world_size else "at 1 process (--world-size N for another)"
    return "; ".join([f"{intervals_text(d.log_every, d.ckpt_every, d.eval_every, d.total_iters)} {where}",
                      *d.interval_notes])


def _scale(cfg: Config, world_size: int) -> str:
    """The processes, the ranks they run and the batch: refused when the virtual ranks do not
    divide over the processes, or the batch or BN groups do not exist at that size."""
    s = derive_scale(cfg, world_size)
    tasks = f"{world_size} task{'' if world_size == 1 else 's'}"
    if not s.virtual_world_size:
        return f"{tasks}, one rank each, {s.global_batch} labeled images per step"
    return (f"{tasks} running {s.world_size} virtual ranks (train.virtual_world_size="
            f"{s.virtual_world_size}, {s.micro_batches} per task), {s.global_batch} labeled images per step")


def _run_dir(rd: RunDir) -> str:
    rd.ensure_writable(create=False)
    who = lock_holder(rd)
    if who is not None:
        raise UserError(f"{rd} is in use by another training ({who})")
    state = "exists" if rd.root.is_dir() else "will be created"
    return f"{rd} {state}, writable, not in use"


def _resume(cfg: Config, rd: RunDir, world_size: int | None, allow_config_change: bool,
            counts: tuple[int, int] | None = None) -> str:
    """The run's saved config accepts this one, and its newest checkpoint can go on with
    `world_size` processes. The checkpoint's "world_size" is its run's ranks (virtual ranks
    included) and "processes" what computed them (absent in older ones: one rank each). The
    same ranks resume exactly, on the same processes bit for bit, on others up to float
    summation order; other ranks are an elastic resume, judged here (the batch and BN groups at
    the new size must exist) and described in one line.

    `counts` (labeled, unlabeled images) lets the line give the run's length in new steps."""
    from simmatch.checkpoint.store import find_checkpoint, run_config  # reading a checkpoint needs torch

    old, source = run_config(rd.root)  # config.yaml, or the newest checkpoint's own when it is missing
    if old is not None:
        judge(old, to_dict(cfg), str(rd), allow_config_change,
              "" if source == str(rd.config) else source)
    found = find_checkpoint(rd.root, required=False)
    if found is None:
        return "no loadable checkpoint: the run starts afresh"
    path, state = found
    judge_checkpoint(state.get("config"), to_dict(cfg), str(path))
    ranks, iteration = state.get("world_size"), state.get("iteration")
    procs = state.get("processes") if isinstance(state.get("processes"), int) else ranks
    head = f"resumes from {path.name} (iteration {iteration}, written by {ranks_text(ranks, procs)})"
    line = _continuation(cfg, head, ranks, procs, iteration, world_size, counts)
    if ranks and iteration is not None and (cfg.optim.iters > 0 or counts is not None):
        total = derive_at(cfg, int(ranks), *(counts or (1, 1))).total_iters  # the run's length as trained
        if int(iteration) >= total:
            line += f"; {FINISHED} (iteration {iteration} of {total}): a job would only report its result"
    return line


def _continuation(cfg: Config, head: str, ranks: int | None, procs: int | None, iteration: int | None,
                  world_size: int | None, counts: tuple[int, int] | None) -> str:
    """How the checkpoint's run goes on with `world_size` processes (see `_resume`)."""
    if world_size is None or not ranks or iteration is None:
        return head
    new_ranks = run_world_size(cfg, world_size)
    if ranks == new_ranks and procs == world_size:
        return head + ": same world size, exact resume"
    if ranks == new_ranks:
        each = (f"{new_ranks // world_size} virtual ranks each" if new_ranks != world_size else "one rank each")
        return (f"{head}: the same {ranks}-rank run continued on {processes_text(world_size)} ({each}): the same "
                f"data positions, batches and recipe, not re-scaled; equal up to float summation order")
    line = f"{head}: {describe_elastic(cfg, ranks, world_size, int(iteration), counts)}"
    if not cfg.train.virtual_world_size and ranks % world_size == 0:
        hint = exact_continuation(cfg, ranks, world_size)
        if hint:
            line += f"; {hint}"
    return line


def exact_continuation(cfg: Config, ranks: int, processes: int) -> str | None:
    """The override that continues a `ranks`-rank run on `processes` processes exactly (virtual
    ranks), when the recipe allows it there; else None."""
    virtual = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, virtual_world_size=ranks))
    try:
        derive_scale(virtual, processes)
    except UserError:
        return None
    return (f"train.virtual_world_size={ranks} would continue the {ranks}-rank run exactly instead "
            f"({ranks // processes} virtual ranks per process)")


def describe_elastic(cfg: Config, old_world: int, processes: int, iteration: int,
                     counts: tuple[int, int] | None = None) -> str:
    """What resuming a run of `old_world` ranks with `processes` processes changes (their run's
    ranks are run_world_size(cfg, processes); checkpoint/elastic.py `describe`); a ConfigError
    naming the key when the recipe has no batch or BN groups at that world size."""
    from simmatch.checkpoint.elastic import describe
    from simmatch.config import derive

    new = derive_scale(cfg, processes)  # its own error first: it names the key that cannot scale
    total = None
    if cfg.optim.iters > 0 or counts is not None:
        total = derive(cfg, processes, *(counts or (1, 1))).total_iters
    return describe(cfg, old_world, new.world_size, iteration, total)


def check_main(cfg: Config, run_dir: Path | RunDir, world_size: int | None, allow_config_change: bool,
               full: bool = False) -> int:
    """Print one line per check; 0 when all pass, 1 otherwise."""
    checks = run_checks(cfg, run_dir, world_size, allow_config_change, full)
    for c in checks:
        print(check_line(c), flush=True)
    failed = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed" +
          (f"; failed: {', '.join(c.name for c in failed)}" if failed else ""), flush=True)
    return 1 if failed else 0
