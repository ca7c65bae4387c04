#!/usr/bin/env python
"""Time SimMatch's target computation (DA, similarities, unfolding, aggregation) on this machine.

Default shape is the official ImageNet 10% one per GPU x 8: Bu=320 unlabeled, K=128,000
bank slots, C=1000 classes, D=128. Prints a table and, last, one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from simmatch.methods.alignment import DistributionAlignment  # noqa: E402
from simmatch.methods.simmatch.method import pseudo_labels  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bu", type=int, default=320)
    ap.add_argument("--k", type=int, default=128_000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(args.bu, args.classes, generator=g).to(dev)
    emb = F.normalize(torch.randn(args.bu, args.dim, generator=g), dim=1).to(dev)
    bank = F.normalize(torch.randn(args.k, args.dim, generator=g), dim=1).to(dev)
    labels = torch.randint(0, args.classes, (args.k,), generator=g).to(dev)
    da = DistributionAlignment(args.classes).to(dev)

    def once() -> None:
        p_w = da(torch.softmax(logits, 1))
        q_w = torch.softmax(emb @ bank.T / 0.1, 1)
        p_hat, q_hat = pseudo_labels(p_w, q_w, labels, 0.9)
        p_hat.max(1)  # the mask

    once()
    times = []
    for _ in range(args.repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        once()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    best, median = min(times), sorted(times)[len(times) // 2]
    print(f"{'device':<8} {'Bu':>6} {'K':>8} {'C':>6} {'best ms':>9} {'median ms':>10}")
    print(f"{dev.type:<8} {args.bu:>6} {args.k:>8} {args.classes:>6} {best * 1e3:>9.1f} {median * 1e3:>10.1f}")
    print(json.dumps({"benchmark": "targets", "device": dev.type, "threads": torch.get_num_threads(),
                      "bu": args.bu, "k": args.k, "classes": args.classes,
                      "best_s": round(best, 5), "median_s": round(median, 5)}))


if __name__ == "__main__":
    main()
