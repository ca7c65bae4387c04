#!/usr/bin/env python
"""Training-step speed of a method through the real engine: img/s, a time breakdown, peak memory.

Examples
  python benchmarks/step.py --arch resnet18 --crop 32 --batch 8 --mu 5 --compare nobank     # CPU
  python benchmarks/step.py --arch resnet50 --batch 8 --mu 5 --backend synthetic           # one GPU
  python benchmarks/step.py --arch resnet50 --batch 8 --mu 5 --backend dali --data DIR
  python benchmarks/step.py --arch resnet18 --crop 32 --batch 8 --mu 5 --virtual 2 4 --repeat 3
  python benchmarks/step.py --arch resnet18 --crop 32 --batch 8 --mu 5 --method simmatchv2 --multicrop \
      --compare simmatch
  python benchmarks/step.py --cfg yaml/cifar10_40.yaml --arch wrn_28_2 --crop 32 --classes 10 --batch 64 --mu 7 \
      --amp none                                                                  # a Table 1 step

Throughput is timed without any per-step host sync; the breakdown is a second pass with a
device sync around each phase. The last line is one JSON object.

--virtual N [N ...]: virtual ranks. One process computes N ranks of --batch + --batch x mu
images each (train.virtual_world_size=N, train.batch_size=N x --batch), as micro-batches of
one optimizer step, against the same micro-batches run as plain steps (virtual ranks off).
Each configuration runs in a fresh subprocess (so that its peak RSS is its own), the
configurations interleaved (plain, N, ..., plain, N, ...) --repeat times, medians reported;
--iters then counts micro-batches per configuration (each times the same images).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
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
# the bank costs; "fixmatch" is Sohn et al.'s FixMatch (one student forward, no teacher);
# "simmatchv2" is SimMatchV2 with the LayerNorm and its unlabeled bank of v2_k (256) global
# unlabeled batches (with --multicrop: the authors' five strong crops, scaled to --crop).
METHODS = {"simmatch": [], "nobank": ["method.name=simmatch", "method.use_bank=false"],
           "fixmatch": ["method.name=fixmatch"], "supervised": ["method.name=supervised"],
           "simmatchv2": ["method.name=simmatchv2", "model.norm_feat=true"]}
# SimMatchV2's --multicrop at 224 px: (size, min scale, max scale) of each strong view
MULTICROP = ((224, 0.14, 1.0), (192, 0.117, 0.86), (160, 0.095, 0.715), (120, 0.073, 0.571), (96, 0.05, 0.429))


def multicrop_overrides(crop: int) -> list[str]:
    """The authors' five strong views with their sizes scaled from 224 px to `crop`."""
    sizes = [max(1, round(size * crop / 224)) for size, _, _ in MULTICROP]
    return [f"data.num_strong={len(MULTICROP)}", f"data.strong_sizes={sizes}",
            f"data.strong_min_scales={[lo for _, lo, _ in MULTICROP]}",
            f"data.strong_max_scales={[hi for _, _, hi in MULTICROP]}", "data.saturation=0.2",
            "data.solarize_prob=0.1"]


def build(args, method: str, run_dir: Path, device: torch.device, virtual: int = 0) -> Trainer:
    """A one-process trainer; with `virtual` = N it computes N ranks of --batch labeled images
    each (train.batch_size is the global batch under the default scale=fixed_global)."""
    overrides = [
        *METHODS[method], f"model.arch={args.arch}",
        f"model.small_input={args.crop <= 64 and not args.arch.startswith('wrn_')}",
        f"data.backend={args.backend}", f"data.crop_size={args.crop}", f"data.num_classes={args.classes}",
        f"data.synthetic_size={max(4096, args.batch * args.mu * 4)}", f"data.num_threads={args.threads}",
        f"data.device={'gpu' if device.type == 'cuda' else 'cpu'}", f"data.prefetch={args.prefetch}",
        f"data.hw_decoder_load={args.hw_decoder_load}",
        f"train.batch_size={args.batch * max(1, virtual)}", f"train.mu={args.mu}", f"train.amp={args.amp}",
        f"train.channels_last={args.channels_last}", f"train.compile={args.compile}",
        f"optim.impl={args.optim}", "optim.iters=1000000", f"train.run_dir={run_dir}",
        "train.log_every=1000000", "train.ckpt_every=1000000",
    ]
    if method == "simmatchv2" and args.multicrop:
        overrides += multicrop_overrides(args.crop)
    else:
        overrides.append(f"data.num_strong={args.num_strong}")
    if virtual:
        overrides.append(f"train.virtual_world_size={virtual}")
    if args.data:
        overrides.append(f"data.root={args.data}")
        overrides.append(f"data.labeled_percent={args.labeled_percent}")
    cfg = load_config(args.cfg, overrides)
    cfg.method.params.propagate_after_epochs = 0  # every loss from the first step
    if hasattr(cfg.method.params, "propagate_after_iters"):
        cfg.method.params.propagate_after_iters = 0
    return Trainer(cfg, run_dir, device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_gib() -> float:
    """This process's resident set now (Linux /proc; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return 0.0


def measure(args, method: str, device: torch.device, virtual: int = 0, iters: int | None = None) -> dict:
    """Time `iters` optimizer steps (default --iters) after --warmup; with `virtual` = N each
    step is N micro-batches of --batch + --batch x mu images."""
    iters = args.iters if iters is None else iters
    n = max(1, virtual)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build(args, method, Path(tmp), device, virtual)
        trainer.method.train()
        # what the built trainer holds: host RSS on the CPU, allocated device memory on a GPU
        held = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else rss_gib()
        for _ in range(args.warmup):
            trainer.step()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # On the CPU each step is also timed alone (no device queue to sync) and the process's CPU
        # time is read: on a shared machine the fastest step and the CPU time per image are less
        # hit by other work than the mean wall time.
        steps_s = []
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(iters):
            t1 = time.perf_counter()
            trainer.step()
            steps_s.append(time.perf_counter() - t1)
        sync(device)
        step_s = (time.perf_counter() - t0) / iters
        cpu_step_s = (time.process_time() - c0) / iters
        timer = PhaseTimer(enabled=True, device=device)
        trainer.method.timer = timer
        breakdown_iters = max(3, iters // 2) if args.breakdown_iters is None else args.breakdown_iters
        for _ in range(breakdown_iters):
            trainer.step()
        breakdown = timer.means_ms()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    views = 1 + (len(MULTICROP) if method == "simmatchv2" and args.multicrop else args.num_strong)
    unl = args.batch * args.mu
    images = n * (args.batch + unl)  # images drawn per optimizer step (an unlabeled one counts once)
    return {"method": method, "virtual": virtual, "micro_batches": n, "step_ms": 1e3 * step_s,
            "img_s": n * (args.batch + unl * views) / step_s, "unlabeled_img_s": n * unl / step_s,
            "images_per_step": images, "ms_per_image": 1e3 * step_s / images,
            "best_ms_per_image": 1e3 * min(steps_s) / images if device.type == "cpu" else None,
            "cpu_ms_per_image": 1e3 * cpu_step_s / images if device.type == "cpu" else None,
            "peak_mem_gib": peak, "mem_before_steps_gib": held,
            "breakdown_ms": {k: round(breakdown.get(k, 0.0), 3) for k in PHASES}}


def run_child(v: int) -> dict:
    """One configuration measured in a fresh interpreter (this script with --child V): its peak
    RSS is its own, not the high-water mark of the configurations before it."""
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child", str(v)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"--child {v} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def compare_virtual(args) -> list[dict]:
    """Plain steps (virtual ranks off) and each --virtual N, interleaved --repeat times; one row
    per configuration with the medians, and the per-image overhead against plain steps."""
    configs = [0, *args.virtual]
    samples: dict[int, list[dict]] = {v: [] for v in configs}
    for _ in range(args.repeat):
        for v in configs:
            samples[v].append(run_child(v))
    rows = []
    for v in configs:
        runs = samples[v]
        row = {key: statistics.median(r[key] for r in runs)
               for key in ("step_ms", "img_s", "unlabeled_img_s", "ms_per_image", "peak_mem_gib",
                           "mem_before_steps_gib")}
        row["step_mem_growth_gib"] = statistics.median(r["peak_mem_gib"] - r["mem_before_steps_gib"] for r in runs)
        cpu = runs[0]["cpu_ms_per_image"] is not None
        # fastest step of all rounds; median CPU time per image (None on a GPU)
        row["best_ms_per_image"] = min(r["best_ms_per_image"] for r in runs) if cpu else None
        row["cpu_ms_per_image"] = statistics.median(r["cpu_ms_per_image"] for r in runs) if cpu else None
        row.update(method=runs[0]["method"], virtual=v, micro_batches=runs[0]["micro_batches"],
                   images_per_step=runs[0]["images_per_step"], repeats=len(runs),
                   ms_per_image_all=[round(r["ms_per_image"], 3) for r in runs],
                   breakdown_ms=runs[0]["breakdown_ms"])
        rows.append(row)
    plain = rows[0]
    for row in rows:
        # time per image against plain steps, in %: median wall time (the figure), and where
        # measured the fastest step and the median CPU time
        row["overhead_pct"] = 100.0 * (row["ms_per_image"] / plain["ms_per_image"] - 1.0)
        for key in ("best", "cpu"):
            row[f"overhead_{key}_pct"] = (100.0 * (row[f"{key}_ms_per_image"] / plain[f"{key}_ms_per_image"] - 1.0)
                                          if row[f"{key}_ms_per_image"] is not None else None)
        row["peak_mem_over_plain_gib"] = row["peak_mem_gib"] - plain["peak_mem_gib"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg", default=None, help="a config whose recipe to time (e.g. yaml/cifar10_40.yaml: "
                    "its targets and views); the flags below override it")
    ap.add_argument("--method", default="simmatch", choices=list(METHODS))
    ap.add_argument("--compare", default=None, choices=["simmatch", "nobank", "fixmatch", "supervised"],
                    help="also run this method and report the step-time ratio")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=8, help="labeled images per step (one process)")
    ap.add_argument("--mu", type=int, default=5)
    ap.add_argument("--num-strong", type=int, default=1)
    ap.add_argument("--multicrop", action="store_true",
                    help="--method simmatchv2 with the authors' five strong crops (sizes scaled to --crop)")
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
    ap.add_argument("--warmup", type=int, default=5, help="optimizer steps before timing")
    ap.add_argument("--iters", type=int, default=20,
                    help="timed optimizer steps (with --virtual: micro-batches per configuration)")
    ap.add_argument("--breakdown-iters", type=int, default=None,
                    help="steps of the phase-breakdown pass (default max(3, iters // 2); 0: none)")
    ap.add_argument("--virtual", type=int, nargs="+", default=[], metavar="N",
                    help="virtual ranks: one process running N ranks of --batch + --batch x mu images per "
                         "optimizer step, against the same micro-batches as plain steps")
    ap.add_argument("--repeat", type=int, default=1,
                    help="with --virtual: rounds of the interleaved configurations (medians reported)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device(args.device)
    if args.child is not None:  # one configuration of --virtual, in its own process
        print(json.dumps(measure(args, args.method, device, args.child,
                                 iters=max(1, args.iters // max(1, args.child)))))
        return
    if any(v < 1 for v in args.virtual) or args.repeat < 1:
        ap.error("--virtual takes counts of 1 or more, --repeat 1 or more")
    if args.virtual and args.compare:
        ap.error("--virtual and --compare are separate measurements: run them one at a time")
    runs = compare_virtual(args) if args.virtual else [measure(args, args.method, device)]
    if args.compare:
        runs.append(measure(args, args.compare, device))

    if args.virtual:
        def pct(v):
            return f"{v:>+7.1f}%" if v is not None else f"{'-':>8}"

        def ms(v):
            return f"{v:>8.2f}" if v is not None else f"{'-':>8}"

        print(f"{'method':<9} {'V/W':>4} {'step ms':>9} {'images':>6} {'ms/image':>8} {'overhead':>8} "
              f"{'best ms':>8} {'overhead':>8} {'CPU ms':>8} {'overhead':>8} {'peak GiB':>8} {'growth':>7}")
        for r in runs:
            print(f"{r['method']:<9} {r['micro_batches'] if r['virtual'] else 'off':>4} {r['step_ms']:>9.1f} "
                  f"{r['images_per_step']:>6} {r['ms_per_image']:>8.2f} {pct(r['overhead_pct'])} "
                  f"{ms(r['best_ms_per_image'])} {pct(r['overhead_best_pct'])} "
                  f"{ms(r['cpu_ms_per_image'])} {pct(r['overhead_cpu_pct'])} "
                  f"{r['peak_mem_gib']:>8.3f} {r['step_mem_growth_gib']:>7.3f}")
        print(f"per image (ms): median wall time, fastest step, median CPU time; overhead against plain steps "
              f"(V/W off); peak memory (CPU: RSS) and its growth over what the built trainer held (GiB); medians of "
              f"{args.repeat} interleaved round(s), each configuration in a fresh process, {args.iters} "
              f"micro-batches timed per configuration")
    else:
        print(f"{'method':<11} {'step ms':>9} {'img/s':>9} {'unl img/s':>10} {'peak GiB':>9}")
        for r in runs:
            print(f"{r['method']:<11} {r['step_ms']:>9.1f} {r['img_s']:>9.1f} {r['unlabeled_img_s']:>10.1f} "
                  f"{r['peak_mem_gib']:>9.2f}")
    if any(runs[0]["breakdown_ms"].values()):
        print("breakdown (ms per call, device-synchronised pass): " + ", ".join(
            f"{k} {v:.1f}" for k, v in runs[0]["breakdown_ms"].items()))
    result = {"benchmark": "step", "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "arch": args.arch, "crop": args.crop, "batch": args.batch, "mu": args.mu,
              "backend": args.backend, "amp": args.amp, "channels_last": args.channels_last,
              "compile": args.compile, "threads": torch.get_num_threads(), "multicrop": args.multicrop, "runs": runs}
    if args.virtual:
        result["repeat"] = args.repeat
        result["overhead_pct"] = {str(r["micro_batches"]): r["overhead_pct"] for r in runs if r["virtual"]}
    if args.compare:
        result["ratio"] = runs[0]["step_ms"] / runs[1]["step_ms"]
        print(f"{runs[0]['method']} / {runs[1]['method']} step-time ratio: {result['ratio']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
