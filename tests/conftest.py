"""Shared test helpers: repository paths and a runner for real multi-process gloo groups."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        import torch

        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_gloo(fn, world: int, tmp_path: Path, *args) -> list:
    """Run fn(rank, world, *args) in `world` real processes joined by gloo; their results."""
    import torch

    port = free_port()
    mp.spawn(_worker, args=(world, port, fn, args, str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture
def gloo():
    return run_gloo


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slower end-to-end tests (CI runs them too)")
    sys.path.insert(0, str(ROOT))
