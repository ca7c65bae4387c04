#!/usr/bin/env python
"""Training-step speed of a method through the real engine: img/s, a time breakdown, peak memory.

Examples
  python benchmarks/step.py --arch resnet18 --crop 32 --batch 8 --mu 5 --compare nobank     # CPU
  python benchmarks/step.py --arch resnet50 --batch 8 --mu 5 --backend synthetic           # one GPU
  python benchmarks/step.py --arch resnet50 --batch 8 --mu 5 --backend dali --data DIR

Throughput is timed without any per-step host sync; the breakdown is a second pass with a
device sync around each phase. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from simmatch.config import load_config  # noqa: E402
from simmatch.engine.trainer import Trainer  # noqa: E402
from simmatch.timing import PhaseTimer  # noqa: E402

PHASES = ["data", "teacher_forward", "targets", "student_forward", "losses", "backward", "optimizer",
          "ema", "bank_update"]


# "nobank": SimMatch without its labeled bank (method.use_bank=false), the yardstick for what
# the bank costs; "fixmatch" is Sohn et al.'s FixMatch (one student forward, no teacher).
METHODS = {"simmatch": [], "nobank": ["method.name=simmatch", "method.use_bank=false"],
           "fixmatch": ["method.name=fixmatch"], "supervised": ["method.name=supervised"]}


def build(args, method: str, run_dir: Path, device: torch.device) -> Trainer:
    overrides = [
        *METHODS[method], f"model.arch={args.arch}", f"model.small_input={args.crop <= 64}",
        f"data.backend={args.backend}", f"data.crop_size={args.crop}", f"data.num_classes={args.classes}",
        f"data.synthetic_size={max(4096, args.batch * args.mu * 4)}", f"data.num_threads={args.threads}",
        f"data.device={'gpu' if device.type == 'cuda' else 'cpu'}", f"data.prefetch={args.prefetch}",
        f"data.hw_decoder_load={args.hw_decoder_load}",
        f"train.batch_size={args.batch}", f"train.mu={args.mu}", f"train.amp={args.amp}",
        f"train.channels_last={args.channels_last}", f"train.compile={args.compile}",
        f"optim.impl={args.optim}", "optim.iters=1000000", f"train.run_dir={run_dir}",
        "train.log_every=1000000", "train.ckpt_every=1000000",
    ]
    if args.data:
        overrides.append(f"data.root={args.data}")
        overrides.append(f"data.labeled_percent={args.labeled_percent}")
    cfg = load_config(None, overrides)
    cfg.method.propagate_after_epochs = 0
    return Trainer(cfg, run_dir, device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args, method: str, device: torch.device) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build(args, method, Path(tmp), device)
        trainer.method.train()
        for _ in range(args.warmup):
            trainer.step()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            trainer.step()
        sync(device)
        step_s = (time.perf_counter() - t0) / args.iters
        timer = PhaseTimer(enabled=True, device=device)
        trainer.method.timer = timer
        for _ in range(max(3, args.iters // 2)):
            trainer.step()
        breakdown = timer.means_ms()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    views = 1 + args.num_strong
    unl = args.batch * args.mu
    return {"method": method, "step_ms": 1e3 * step_s,
            "img_s": (args.batch + unl * views) / step_s, "unlabeled_img_s": unl / step_s,
            "peak_mem_gib": peak, "breakdown_ms": {k: round(breakdown.get(k, 0.0), 3) for k in PHASES}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="simmatch", choices=list(METHODS))
    ap.add_argument("--compare", default=None, choices=["nobank", "fixmatch", "supervised"],
                    help="also run this method and report the step-time ratio")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=8, help="labeled images per step (one process)")
    ap.add_argument("--mu", type=int, default=5)
    ap.add_argument("--num-strong", type=int, default=1)
    ap.add_argument("--backend", default="synthetic", choices=["synthetic", "dali", "torch"])
    ap.add_argument("--data", default="", help="ImageNet-style tree for the dali/torch backends")
    ap.add_argument("--labeled-percent", type=float, default=10.0)
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--optim", default="foreach", choices=["foreach", "fused", "plain"])
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--hw-decoder-load", type=float, default=0.65)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device(args.device)
    runs = [measure(args, args.method, device)]
    if args.compare:
        runs.append(measure(args, args.compare, device))

    print(f"{'method':<11} {'step ms':>9} {'img/s':>9} {'unl img/s':>10} {'peak GiB':>9}")
    for r in runs:
        print(f"{r['method']:<11} {r['step_ms']:>9.1f} {r['img_s']:>9.1f} {r['unlabeled_img_s']:>10.1f} "
              f"{r['peak_mem_gib']:>9.2f}")
    print("breakdown (ms, device-synchronised pass): " + ", ".join(
        f"{k} {v:.1f}" for k, v in runs[0]["breakdown_ms"].items()))
    result = {"benchmark": "step", "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "arch": args.arch, "crop": args.crop, "batch": args.batch, "mu": args.mu,
              "backend": args.backend, "amp": args.amp, "channels_last": args.channels_last,
              "compile": args.compile, "threads": torch.get_num_threads(), "runs": runs}
    if args.compare:
        result["ratio"] = runs[0]["step_ms"] / runs[1]["step_ms"]
        print(f"{runs[0]['method']} / {runs[1]['method']} step-time ratio: {result['ratio']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
