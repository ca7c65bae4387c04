"""Run every self-test check on every rank, merge the outcomes, print one line per check.

Ranks come from torchrun, SLURM (slurm/selftest_job.py) or tools/selftest.py --nproc; a
single process joins a 1-rank group of its own so that the collectives are exercised too.
Checks that use collectives (collectives, bank, train step, throughput) run in the same
order on every rank; the others are per rank.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as tdist

from simmatch import distributed as dist
from simmatch.selftest import driver, memory, pipelines, step
from simmatch.selftest.cli import parse_args
from simmatch.selftest.report import FAIL, SKIP, Check, exit_code, merge, summary
from simmatch.selftest.samples import image_files, link_subset, write_samples


def _join_group(cuda: bool) -> None:
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(dist.local_device_index())
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        dist.init(backend, timeout_s=300)
        return
    from simmatch.launch.local import free_port

    tdist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                             world_size=1, timeout=timedelta(seconds=300))


_skipped: set[str] = set()


def _guard(name: str, fn: Callable[[], Check]) -> Check:
    """A check that raises is a FAIL naming the exception, not a traceback."""
    if name.replace(" ", "-") in _skipped:
        return Check(name, SKIP, "left out by --skip")
    t0 = time.perf_counter()
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - every failure becomes a report line
        where = traceback.extract_tb(exc.__traceback__)[-1]
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return Check(name, FAIL, f"{type(exc).__name__}: {first} ({Path(where.filename).name}:{where.lineno})",
                     "report it with this line")
    finally:
        if os.environ.get("SIMMATCH_SELFTEST_TIMES"):
            print(f"[{name}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)


def run_checks(args: argparse.Namespace, sample_root: Path, device: torch.device) -> list[Check]:
    cuda = device.type == "cuda"
    rank, world = tdist.get_rank(), tdist.get_world_size()
    threads = args.threads or (4 if cuda else 1)
    try:
        import nvidia.dali  # noqa: F401
        has_dali = True
    except ImportError:
        has_dali = False
    no_dali = Check("", SKIP, "NVIDIA DALI is not installed", "pip install -e '.[dali]'")
    no_cuda = "no CUDA device: the GPU path cannot run here"
    from simmatch.config import load_config

    data_cfg = load_config(None, [f"data.num_threads={threads}"]).data
    train_files = image_files(sample_root, "train")
    checks = [_guard("driver", driver.run)]

    def dali_check(name: str, fn: Callable[[], Check], needs_cuda: bool) -> Check:
        if not has_dali:
            return Check(name, SKIP, no_dali.reason, no_dali.fix)
        if name.replace(" ", "-") in _skipped:
            return Check(name, SKIP, "left out by --skip")
        if needs_cuda and not cuda:
            return Check(name, SKIP, no_cuda, "run on a GPU node (python tools/submit.py --selftest)")
        return _guard(name, fn)

    checks.append(dali_check("nvjpeg decode", lambda: pipelines.check_decode(
        "nvjpeg decode", sample_root / "train", train_files, "gpu", data_cfg, device.index), True))
    checks.append(dali_check("cpu decode", lambda: pipelines.check_decode(
        "cpu decode", sample_root / "train", train_files, "cpu", data_cfg, None), False))
    if cuda:
        setup = pipelines.StreamSetup("DALI GPU", ["data.backend=dali", "data.device=gpu"],
                                      "DALI CPU", ["data.backend=dali", "data.device=cpu"])
        crop, batches = 224, 4
    else:
        setup = pipelines.StreamSetup("DALI CPU", ["data.backend=dali", "data.device=cpu"],
                                      "torch", ["data.backend=torch", "data.num_threads=1"], shift=True)
        crop, batches = 64, 3
    checks.append(dali_check("val stream", lambda: pipelines.check_val(
        setup, [], sample_root, rank, world, device, crop, threads), False))
    checks.append(dali_check("train streams", lambda: pipelines.check_train(
        setup, [], sample_root, rank, world, device, crop, threads, batches), False))

    from simmatch.selftest import collectives

    checks.append(_guard("collectives", lambda: collectives.check_collectives(device, 256 if cuda else 4)))
    checks.append(_guard("bank all-gather", lambda: collectives.check_bank(device)))
    setup_step = step.GPU_SETUP if cuda else step.CPU_SETUP
    checks.append(_guard("train step", lambda: step.check_step(setup_step, world, device, threads)))
    checks.append(_guard("throughput", lambda: step.check_throughput(
        setup_step, world, device, sample_root, threads, "gpu" if cuda else "cpu")[0]))
    tasks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "1")
                         .split("(")[0] or 1)
    pinned_cfg = load_config(None, [f"data.num_threads={args.threads}"] if args.threads else []).data
    checks.append(dali_check("pinned memory", lambda: memory.check_pinned(pinned_cfg, cuda, tasks_per_node),
                             False))
    return checks


def run(argv: list[str] | None = None) -> tuple[int, list[str]]:
    """Every rank runs the checks; returns (exit code, report lines) on every rank."""
    args = parse_args(argv)
    _skipped.clear()
    _skipped.update(args.skipped)
    cuda = torch.cuda.is_available()
    _join_group(cuda)
    rank, world = tdist.get_rank(), tdist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    tmp = Path(tempfile.mkdtemp(prefix="simmatch-selftest-"))
    try:
        if rank == 0:
            print(f"selftest: {world} rank(s), {'CUDA ' + torch.cuda.get_device_name(device) if cuda else 'CPU only'}, "
                  f"images from {args.data or 'sample JPEGs'}", flush=True)
        root = link_subset(Path(args.data), tmp / "data") if args.data else write_samples(tmp / "data")
        checks = run_checks(args, root, device)
        merged = merge(dist.all_gather_objects(checks))
        lines = [c.line() for c in merged] + [summary(merged, world, device.type)]
        if rank == 0:
            print("\n".join(lines), flush=True)
        tdist.barrier()  # rank 0 has printed before any rank exits
        return exit_code(merged), lines
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if tdist.is_initialized():
            tdist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    from simmatch.errors import UserError

    try:
        code, _ = run(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return code
