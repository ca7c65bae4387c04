#!/usr/bin/env python
"""Cost of a checkpoint: ResNet-50 student + EMA teacher + optimizer + the 10% bank (K=128k).

Reports the training stall (state copied to the host; the file is written by a thread),
the background write time (SHA-256 digest included) and file size, and the time a reader
spends checking the digest (read + hash) before loading. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from simmatch.checkpoint.saver import CheckpointSaver
from simmatch.checkpoint.store import verify  # noqa: E402
from simmatch.methods.simmatch.method import SimMatch  # noqa: E402
from simmatch.models import build_network  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--bank", type=int, default=128_000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    labels = torch.randint(0, args.classes, (args.bank,))
    method = SimMatch(build_network(args.arch, args.classes), 0.999, labels, args.classes, tau=0.7,
                      temperature=0.1, alpha=0.9, lambda_u=10, lambda_in=5).to(dev)
    opt = torch.optim.SGD(method.student.parameters(), lr=0.1, momentum=0.9)
    for p in method.student.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # momentum buffers exist, as in training

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        saver = CheckpointSaver(Path(tmp), keep=2, background=True)
        stalls, writes, checks = [], [], []
        for i in range(args.repeats):
            state = {"iteration": i, "method": method.state_dict(), "optimizer": opt.state_dict()}
            saver.save(state, i)
            stalls.append(saver.last_stall_s)
            saver.wait()
            writes.append(saver.last_write_s)
            t0 = time.perf_counter()
            verify(saver.path_for(i))
            checks.append(time.perf_counter() - t0)
        size = saver.path_for(args.repeats - 1).stat().st_size
    stall, write, check = min(stalls), min(writes), min(checks)
    print(f"{'device':<8} {'arch':<10} {'bank K':>8} {'size MB':>8} {'stall s':>8} {'write s':>8} {'verify s':>8}")
    print(f"{dev.type:<8} {args.arch:<10} {args.bank:>8} {size / 1e6:>8.1f} {stall:>8.3f} {write:>8.3f} "
          f"{check:>8.3f}")
    print(json.dumps({"benchmark": "checkpoint", "device": dev.type, "arch": args.arch, "bank": args.bank,
                      "size_mb": round(size / 1e6, 1), "stall_s": round(stall, 4), "write_s": round(write, 4),
                      "verify_s": round(check, 4)}))


if __name__ == "__main__":
    main()
