#!/usr/bin/env python
"""CTAugment's CPU time per ReMixMatch step (simmatch/methods/remixmatch/ctaugment.py): the labeled batch
(probe and training image per sample, `augment_labeled`) and the K strong views (`augment_batch` per view),
on normalised [b, 3, side, side] batches as the data backends deliver them, with rates learned for a
while (so that thresholding shapes the draws). Median of --repeat steps. Prints a table and, last, one
JSON object.

  python benchmarks/ctaugment.py                       # CIFAR: 32 px, b = 64, K = 8 and K = 1
  python benchmarks/ctaugment.py --side 96 --views 2    # STL-10's side
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from simmatch.methods.remixmatch.ctaugment import CTAugment  # noqa: E402

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]


def photo_batch(side: int, batch: int) -> torch.Tensor:
    """Blocky random images (photo-like enough for the histogram ops), normalised."""
    base = np.random.default_rng(0).integers(0, 256, size=(side // 4, side // 4, 3), dtype=np.uint8)
    block = base.repeat(4, 0).repeat(4, 1)
    u8 = torch.from_numpy(np.stack([np.roll(block, k, axis=1) for k in range(batch)])).permute(0, 3, 1, 2)
    return (u8.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def trained(steps: int = 200, batch: int = 64) -> CTAugment:
    """Rates after `steps` updates from random accuracies (a skewed policy, as in training)."""
    cta = CTAugment()
    gen = np.random.default_rng(0)
    for _ in range(steps):
        policies = cta.encode([cta.sample(gen, probe=True) for _ in range(batch)])
        score = torch.from_numpy(gen.random(batch).astype(np.float32))
        cta.update(policies, score)
    return cta


def time_step(cta: CTAugment, x: torch.Tensor, views: int, step: int) -> dict[str, float]:
    """Seconds of one step's labeled part, its strong views, and the rate update."""
    gen = np.random.default_rng([step, 1])
    t0 = time.perf_counter()
    _, _, policies = cta.augment_labeled(x, MEAN, STD, gen)
    t1 = time.perf_counter()
    gen = np.random.default_rng([step, 2])
    for _ in range(views):
        cta.augment_batch(x, MEAN, STD, gen)
    t2 = time.perf_counter()
    before = cta.rates.clone()
    cta.update(policies, torch.full((x.shape[0],), 0.5))
    t3 = time.perf_counter()
    cta.rates.copy_(before)  # every repeat samples from the same rates
    return {"labeled": t1 - t0, "strong": t2 - t1, "update": t3 - t2, "step": t3 - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--views", type=int, nargs="+", default=[8, 1], help="K, strong views per unlabeled image")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    x = photo_batch(args.side, args.batch)
    rows = []
    cta = trained()
    time_step(cta, x, 1, 10**6)  # warm up
    for k in args.views:
        runs = [time_step(cta, x, k, r) for r in range(args.repeat)]
        med = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        images = args.batch * (2 + k)  # probe + training image per labeled one, K views per unlabeled one
        rows.append({"views": k, "images": images, **{f"{key}_ms": round(v * 1e3, 2) for key, v in med.items()},
                     "us_per_image": round(med["step"] / images * 1e6, 1)})
    print(f"CTAugment per step: {args.side} px, b = {args.batch}, CPU ({os.cpu_count()} cores), median of "
          f"{args.repeat}")
    print("| K | images | labeled ms | strong ms | update ms | step ms | us/image |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['views']} | {r['images']} | {r['labeled_ms']:.1f} | {r['strong_ms']:.1f} | {r['update_ms']:.2f} "
              f"| {r['step_ms']:.1f} | {r['us_per_image']:.0f} |")
    print(json.dumps({"side": args.side, "batch": args.batch, "repeat": args.repeat, "cpus": os.cpu_count(),
                      "rows": rows}))


if __name__ == "__main__":
    main()
