#!/usr/bin/env python
"""Views per second of the small-image augmentations (data.augment=translate, the Table 1 recipes)
on the CPU: the DALI pipeline's weak and strong views (dali_pipelines/small_augment.py) and the
torch backend's (simmatch/data/small_augment.py, one process, seeded per sample as its streams
are). Prints a table and, last, one JSON object.

  python benchmarks/small_views.py --side 32 --batch 448 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402


def photo_batch(side: int, batch: int) -> list[np.ndarray]:
    """Blocky random images (photo-like enough for the histogram ops), one per sample."""
    base = np.random.default_rng(0).integers(0, 256, size=(side // 4, side // 4, 3), dtype=np.uint8)
    block = base.repeat(4, 0).repeat(4, 1)
    return [np.ascontiguousarray(np.roll(block, k, axis=1)) for k in range(batch)]


def dali_rates(images: list[np.ndarray], pad: int, threads: int, iters: int) -> dict[str, float]:
    from nvidia.dali import fn, pipeline_def

    from dali_pipelines.common import quiet_dali_deprecations
    from dali_pipelines.small_augment import strong, weak

    rates = {}
    for name in ("weak", "strong"):
        @pipeline_def(batch_size=len(images), num_threads=threads, device_id=None, seed=0, enable_conditionals=True)
        def pipe(name=name):
            x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
            return weak(x, pad) if name == "weak" else strong(x, pad)

        with quiet_dali_deprecations():
            p = pipe()
            p.build()
        p.run()
        start = time.perf_counter()
        for _ in range(iters):
            p.run()
        rates[f"dali_{name}"] = len(images) * iters / (time.perf_counter() - start)
    return rates


def torch_rates(images: list[np.ndarray], pad: int, iters: int) -> dict[str, float]:
    import torch

    from simmatch.data.small_augment import strong, weak

    rates = {}
    for name, view in (("weak", weak), ("strong", strong)):
        start = time.perf_counter()
        for it in range(iters):
            for k, img in enumerate(images):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(it * len(images) + k)
                    view(img, pad)
        rates[f"torch_{name}"] = len(images) * iters / (time.perf_counter() - start)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=32)
    ap.add_argument("--batch", type=int, default=448)
    ap.add_argument("--threads", type=int, default=2, help="DALI's CPU threads")
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    images = photo_batch(args.side, args.batch)
    pad = int(round(0.125 * args.side))
    rates = {**dali_rates(images, pad, args.threads, args.iters), **torch_rates(images, pad, max(1, args.iters // 5))}
    print(f"| view ({args.side} px, batch {args.batch}, CPU) | images/s |")
    print("|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:,.0f} |")
    print(json.dumps({"side": args.side, "batch": args.batch, "threads": args.threads,
                      **{k: round(v, 1) for k, v in rates.items()}}))


if __name__ == "__main__":
    main()
