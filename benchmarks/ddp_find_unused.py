#!/usr/bin/env python
"""Host time that DDP's find_unused_parameters=True adds per step (one walk of the autograd graph
after forward), which the trainer pays for a fixed bucket layout (exact resume above 2 ranks).

  python benchmarks/ddp_find_unused.py [REPS]

ResNet-50 of this project in a one-process gloo group on tiny inputs, so the walk is not hidden
by compute; the two settings alternate step by step and the medians of forward (with DDP's
post-forward) are compared.
"""
from __future__ import annotations

import copy
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from simmatch.models import build_network  # noqa: E402


def main(reps: int) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    net = build_network("resnet50", 1000)
    x = torch.randn(2, 3, 32, 32)
    models = {fu: DDP(copy.deepcopy(net), find_unused_parameters=fu) for fu in (False, True)}
    times: dict[bool, list[float]] = {False: [], True: []}
    for rep in range(reps):
        for fu, model in models.items():
            t0 = time.perf_counter()
            logits, emb = model(x)
            t1 = time.perf_counter()
            (logits.sum() + emb.sum()).backward()
            if rep >= 3:  # warm-up
                times[fu].append(t1 - t0)
    med = {fu: statistics.median(v) * 1e3 for fu, v in times.items()}
    print(f"forward + DDP post-forward, median ms: find_unused_parameters=False {med[False]:.2f}, "
          f"True {med[True]:.2f}, difference {med[True] - med[False]:.2f} ms "
          f"({sum(1 for _ in net.parameters())} parameters)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
