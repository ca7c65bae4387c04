#!/usr/bin/env python
"""Host time of the per-step agreement on stop signals and data errors (simmatch/engine/stop.py):
one small gloo all-reduce every step, after the batches are drawn and before the step's first
collective, so that an image one rank cannot read stops every rank at once. Also the step's mark
(each stream's position and the torch RNG state, kept so that a failed draw is saved as not begun).

  python benchmarks/step_agreement.py [--ranks 2 3 4] [--steps 2000]

Each world size runs as that many real processes on this machine (gloo over loopback); every
rank times `StopRequest.agree(None)` back to back, the median of the ranks' means is reported.
Prints a table, then one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _rank(rank: int, world: int, port: int, steps: int, out: str) -> None:
    from simmatch.engine.stop import StopRequest

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    stop = StopRequest()
    for _ in range(50):  # warm-up
        stop.agree(None)
    t0 = time.perf_counter()
    for _ in range(steps):
        stop.agree(None)
    agree_us = (time.perf_counter() - t0) / steps * 1e6
    t0 = time.perf_counter()
    for _ in range(steps):
        torch.get_rng_state()
    mark_us = (time.perf_counter() - t0) / steps * 1e6
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump({"agree_us": agree_us, "rng_mark_us": mark_us}, f)
    dist.destroy_process_group()


def measure(world: int, steps: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(world, port, steps, out), nprocs=world, join=True, start_method="spawn")
        ranks = [json.load(open(os.path.join(out, f"{r}.json"))) for r in range(world)]
    agree = sorted(r["agree_us"] for r in ranks)
    mark = sorted(r["rng_mark_us"] for r in ranks)
    return {"ranks": world, "agree_us": agree[len(agree) // 2], "rng_mark_us": mark[len(mark) // 2]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--steps", type=int, default=2000)
    args = ap.parse_args()
    rows = [measure(w, args.steps) for w in args.ranks]
    print(f"{'ranks':>5}  {'agreement per step (us)':>24}  {'RNG mark per step (us)':>22}")
    for r in rows:
        print(f"{r['ranks']:>5}  {r['agree_us']:>24.1f}  {r['rng_mark_us']:>22.1f}")
    print(json.dumps({"benchmark": "step_agreement", "steps": args.steps, "rows": rows}))


if __name__ == "__main__":
    main()
