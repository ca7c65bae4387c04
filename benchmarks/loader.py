#!/usr/bin/env python
"""Images/s of the unlabeled stream (weak + SimCLR-style strong view) per data backend.

Both backends read the same files with the same augmentations and the same number of
threads (DALI CPU threads vs DataLoader worker processes); one image = one decode and two
augmented views. Wall-clock images/s is what training sees; CPU ms per image (this process
and its workers, from /proc) stays comparable when other jobs share the machine. Prints a
table, the DALI/torch ratios and, as its last line, one JSON object.

    python benchmarks/loader.py --data DIR --backend all --device cpu --batch 32 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from simmatch.config import load_config
from simmatch.data import build_streams
from simmatch.errors import cli_errors


def cpu_seconds() -> float:
    """CPU time of this process and its live children (DataLoader workers), from /proc.

    Robust to other load on a shared machine, unlike wall time; 0 where /proc is missing.
    """
    tick = os.sysconf("SC_CLK_TCK")
    me, total = os.getpid(), 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == me or int(fields[1]) == me:  # fields[1]: parent pid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def measure(data: str, backend: str, device: str, batch: int, threads: int, iters: int,
            warmup: int, crop: int, strong: str) -> dict:
    num_classes = sum(1 for e in os.scandir(os.path.join(data, "train")) if e.is_dir())
    cfg = load_config(None, [
        f"data.root={data}", f"data.num_classes={num_classes}", "data.labeled_per_class=1",
        f"data.backend={backend}", f"data.device={device}", f"data.crop_size={crop}",
        f"data.num_threads={threads}", f"data.strong={strong}", "data.num_strong=1",
        f"train.batch_size={batch}", "train.mu=1"])
    target = torch.device("cuda" if device == "gpu" else "cpu")
    streams = build_streams(cfg, rank=0, world_size=1, device=target)
    stream = streams.unlabeled
    for _ in range(warmup):  # pipeline build, worker start-up, first decodes
        next(stream)
    if target.type == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), cpu_seconds()
    for _ in range(iters):
        batch_out = next(stream)
    if target.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    cpu = cpu_seconds() - cpu_start
    assert batch_out["weak"].shape[0] == batch
    streams.close()
    return {"backend": backend, "device": device, "batch": batch, "threads": threads,
            "crop": crop, "strong": strong, "iters": iters, "seconds": round(seconds, 3),
            "images_per_s": round(batch * iters / seconds, 1),
            "cpu_ms_per_image": round(1000 * cpu / (batch * iters), 2)}


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="tree with train/<class>/*.jpg")
    parser.add_argument("--backend", choices=["dali", "torch", "all"], default="all")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--batch", type=int, default=32, help="unlabeled images per batch")
    parser.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers")
    parser.add_argument("--iters", type=int, default=40, help="timed batches")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--strong", choices=["simclr", "randaugment"], default="simclr")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds (backends alternate within a round); the median is reported")
    args = parser.parse_args(argv)
    backends = ["dali", "torch"] if args.backend == "all" else [args.backend]
    runs: dict[str, list[dict]] = {b: [] for b in backends}
    for _ in range(max(1, args.repeat)):
        for b in backends:
            runs[b].append(measure(args.data, b, args.device, args.batch, args.threads, args.iters,
                                   args.warmup, args.crop, args.strong))
    rows = []
    for b in backends:
        row = dict(runs[b][0])
        row["runs_images_per_s"] = [r["images_per_s"] for r in runs[b]]
        row["images_per_s"] = round(statistics.median(row["runs_images_per_s"]), 1)
        row["cpu_ms_per_image"] = round(statistics.median(r["cpu_ms_per_image"] for r in runs[b]), 2)
        del row["seconds"]
        rows.append(row)
    print(f"{'backend':<8} {'device':<6} {'batch':>5} {'threads':>7} {'crop':>4} {'img/s':>8} "
          f"{'cpu-ms/img':>10}")
    for r in rows:
        print(f"{r['backend']:<8} {r['device']:<6} {r['batch']:>5} {r['threads']:>7} "
              f"{r['crop']:>4} {r['images_per_s']:>8.1f} {r['cpu_ms_per_image']:>10.2f}")
    result: dict = {"rows": rows}
    speed = {r["backend"]: r["images_per_s"] for r in rows}
    if "dali" in speed and "torch" in speed:
        cpu = {r["backend"]: r["cpu_ms_per_image"] for r in rows}
        result["dali_over_torch"] = round(speed["dali"] / speed["torch"], 2)
        result["dali_over_torch_cpu"] = round(cpu["torch"] / max(cpu["dali"], 1e-9), 2)
        print(f"DALI/torch: {result['dali_over_torch']:.2f}x images/s, "
              f"{result['dali_over_torch_cpu']:.2f}x images per CPU-second")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
