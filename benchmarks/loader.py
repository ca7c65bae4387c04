#!/usr/bin/env python
"""Images/s of the unlabeled stream (weak + SimCLR-style strong view) per data backend and format.

Both backends read the same files with the same augmentations and the same number of
threads (DALI CPU threads vs DataLoader worker processes); one image = one decode and two
augmented views. Wall-clock images/s is what training sees; CPU ms per image (the measuring
process and its workers, from /proc) stays comparable when other jobs share the machine.

--format folder reads the tree under --data (data.format=folder); --format shards reads the
indexed tar shards tools/make_shards.py packed from it (--shards, data.format=shards); both
give the same images in the same order. Every measurement runs in a fresh child process (this
script with --child), so each one opens its files from scratch.

Opens: one more child per backend and format runs under `strace -f -e trace=open,openat`; the
open/openat calls of that process and its children on paths under the data tree (or the shard
folder) while the timed batches run are `opens` (null where strace is missing).

--open-delay-ms D: the measurement runs with an LD_PRELOAD shim (benchmarks/open_delay.c,
compiled with gcc into a temporary folder) that sleeps D ms in every open of a path under the
data tree or shard folder: an injected stand-in for a network file system's per-open metadata
round trip, not a real network mount (the reads themselves stay local).

Prints a table (`busy`: CPU seconds per second of the process and its workers, and per thread: the
CPU utilisation), the ratios, the load average around them and, last, one JSON object.

    python benchmarks/loader.py --data DIR --backend all --device cpu --batch 32 --threads 2
    python benchmarks/loader.py --data DIR --shards OUT --format both --open-delay-ms 0 1
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from simmatch.config import derive_scale, load_config  # noqa: E402
from simmatch.data import build_streams  # noqa: E402
from simmatch.errors import ConfigError, DataError, cli_errors  # noqa: E402

SHIM_SOURCE = os.path.join(HERE, "open_delay.c")
MARK = "/nonexistent-loader-benchmark"  # opened (and not found) around the timed batches: strace sees it
OPEN_CALL = re.compile(r'\b(?:open|openat)\((?:(AT_FDCWD|-?\d+)(?:<([^>]*)>)?, )?"((?:[^"\\]|\\.)*)"')


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


def mark(name: str) -> None:
    """An open that strace records and that fails at once: where the timed part starts and ends."""
    try:
        os.close(os.open(f"{MARK}/{name}", os.O_RDONLY))
    except OSError:
        pass


def count_classes(data: str | None, shards: str | None) -> int:
    if data:
        return sum(1 for e in os.scandir(os.path.join(data, "train")) if e.is_dir())
    from simmatch.shards.index import read_index

    return len(read_index(shards, "train").classes)


def measure(data: str | None, fmt: str, shards: str | None, backend: str, device: str, batch: int,
            threads: int, iters: int, warmup: int, crop: int, strong: str, ctaugment: bool = False,
            settings: list[str] = ()) -> dict:
    """One measurement in this process (the parent runs it in a child: --child). `ctaugment`: each
    batch's strong view then gets a CTAugment policy, as ReMixMatch's step does in the training
    process on the CPU (the part no pipeline can run: the policy follows the training)."""
    from simmatch.shards.source import shard_opens

    where = [f"data.root={data}"] if fmt == "folder" else ["data.format=shards", f"data.shards={shards}"]
    cfg = load_config(None, [
        *where, f"data.num_classes={count_classes(data, shards)}", "data.labeled_per_class=1",
        f"data.backend={backend}", f"data.device={device}", f"data.crop_size={crop}",
        f"data.num_threads={threads}", f"data.strong={strong}", "data.num_strong=1",
        f"train.batch_size={batch}", "train.mu=1", *settings])
    target = torch.device("cuda" if device == "gpu" else "cpu")
    scale = derive_scale(cfg, 1)
    streams = build_streams(cfg, scale, scale.ranks_of(0), 0, target)
    stream = streams.unlabeled
    policy = None
    if ctaugment:
        import numpy as np

        from simmatch.methods.remixmatch.ctaugment import CTAugment

        policy, gen = CTAugment(), np.random.default_rng(0)

    def draw() -> dict:
        out = next(stream)
        if policy is not None:
            out["strong"] = [policy.augment_batch(v, cfg.data.mean, cfg.data.std, gen)[0] for v in out["strong"]]
        return out

    for _ in range(warmup):  # pipeline build, worker start-up, first decodes
        draw()
    if target.type == "cuda":
        torch.cuda.synchronize()
    mark("start")
    opens_before = shard_opens()
    start, cpu_start = time.perf_counter(), cpu_seconds()
    for _ in range(iters):
        batch_out = draw()
    if target.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    cpu = cpu_seconds() - cpu_start
    mark("end")
    assert batch_out["weak"].shape[0] == batch
    row = {"backend": backend, "format": fmt, "settings": list(settings), "device": device, "batch": batch,
           "threads": threads,
           "crop": crop, "strong": strong, "ctaugment": ctaugment, "iters": iters, "seconds": round(seconds, 3),
           "images_per_s": round(batch * iters / seconds, 1),
           "cpu_ms_per_image": round(1000 * cpu / (batch * iters), 2),
           "cores_busy": round(cpu / seconds, 2),  # CPU seconds per second: 2.0 = two cores all the time
           "epoch_images": streams.num_unlabeled}
    if fmt == "shards":
        # shard files this process (not its DataLoader workers) opened in the timed part
        row["shard_opens_this_process"] = shard_opens() - opens_before
    streams.close()
    return row


def under(path: str, prefix: str) -> bool:
    path = os.path.normpath(path)
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def count_opens(trace: str, prefix: str, cwd: str) -> tuple[int | None, int]:
    """(opens under `prefix` between the start and end marks, opens under it in the whole trace)
    of an `strace -f -y -e trace=open,openat` log; the first is None without both marks."""
    timed = whole = 0
    state = "before"
    with open(trace, errors="replace") as f:
        for line in f:
            m = OPEN_CALL.search(line)
            if m is None:
                continue
            dirfd, dir_path, path = m.groups()
            if path == f"{MARK}/start":
                state = "timed"
                continue
            if path == f"{MARK}/end":
                state = "after"
                continue
            if not path.startswith("/"):
                base = dir_path if dirfd not in (None, "AT_FDCWD") and dir_path else cwd
                path = os.path.join(base, path)
            if under(path, prefix):
                whole += 1
                timed += state == "timed"
    return (timed if state == "after" else None), whole


def child_command(args, backend: str, fmt: str, threads: int) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--backend", backend, "--format", fmt,
           "--device", args.device, "--batch", str(args.batch), "--threads", str(threads),
           "--iters", str(args.iters), "--warmup", str(args.warmup), "--crop", str(args.crop),
           "--strong", args.strong] + (["--ctaugment"] if args.ctaugment else [])
    if args.set:
        cmd += ["--set", *args.set]
    if args.data:
        cmd += ["--data", args.data]
    if args.shards:
        cmd += ["--shards", args.shards]
    return cmd


def run_child(cmd: list[str], env: dict, what: str) -> dict:
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
        raise DataError(f"{what} failed (exit {res.returncode}): "
                        + (errors[-1][7:] if errors else res.stderr[-2000:]))
    return json.loads(lines[-1])


def child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def build_shim(folder: str) -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise ConfigError("--open-delay-ms needs gcc to compile benchmarks/open_delay.c (not found)")
    out = os.path.join(folder, "open_delay.so")
    res = subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-o", out, SHIM_SOURCE, "-ldl"],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise ConfigError(f"compiling {SHIM_SOURCE} failed: {res.stderr[-2000:]}")
    return out


def summarize(rows: list[dict], threads: int, shard_counts: dict) -> dict:
    """Median rows plus ratios: shards/folder per backend and delay, DALI/torch per format and delay."""
    key = lambda r: (r["backend"], r["format"], r["open_delay_ms"])  # noqa: E731
    speed = {key(r): r["images_per_s"] for r in rows}
    cpu = {key(r): r["cpu_ms_per_image"] for r in rows}
    result: dict = {}
    sof: dict = {}
    sof_cpu: dict = {}
    dot: dict = {}
    for (b, f, d) in speed:
        delay = f"{d:g}"
        if f == "shards" and (b, "folder", d) in speed:
            sof.setdefault(b, {})[delay] = round(speed[(b, f, d)] / speed[(b, "folder", d)], 2)
            sof_cpu.setdefault(b, {})[delay] = round(cpu[(b, "folder", d)] / max(cpu[(b, f, d)], 1e-9), 2)
        if b == "dali" and ("torch", f, d) in speed:
            dot[f"{f}@{delay}ms"] = (round(speed[(b, f, d)] / speed[("torch", f, d)], 2),
                                     round(cpu[("torch", f, d)] / max(cpu[(b, f, d)], 1e-9), 2))
    if dot:
        first = next(iter(dot.values()))  # the first format and delay measured (today's single figure)
        result["dali_over_torch"], result["dali_over_torch_cpu"] = first
        result["dali_over_torch_by"] = {k: v[0] for k, v in dot.items()}
        result["dali_over_torch_cpu_by"] = {k: v[1] for k, v in dot.items()}
    if sof:
        result["shards_over_folder"] = sof  # images/s, per backend and open delay (ms)
        result["shards_over_folder_cpu"] = sof_cpu  # images per CPU-second
    if shard_counts:
        result["shards"] = shard_counts["shards"]
        # the goal for shard opens per epoch: no more than shards x reader threads
        result["shard_opens_bound"] = shard_counts["shards"] * threads
    return result


def scaling(rows: list[dict]) -> dict:
    """images/s at N threads / (N / n x images/s at the fewest threads n), per backend, format and delay."""
    fewest: dict = {}
    for r in rows:
        k = (r["backend"], r["format"], r["open_delay_ms"])
        if k not in fewest or r["threads"] < fewest[k]["threads"]:
            fewest[k] = r
    eff = {}
    for r in rows:
        base = fewest[(r["backend"], r["format"], r["open_delay_ms"])]
        if r["threads"] > base["threads"]:
            ideal = base["images_per_s"] * r["threads"] / base["threads"]
            eff[f"{r['backend']}/{r['format']}/{r['open_delay_ms']:g}ms@{r['threads']}"] = \
                round(r["images_per_s"] / ideal, 2)
    return {"parallel_efficiency": eff} if eff else {}


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="tree with train/<class>/*.jpg (and val/); needed for --format folder")
    parser.add_argument("--shards", help="the folder tools/make_shards.py packed (train.index, train/*.tar)")
    parser.add_argument("--format", choices=["folder", "shards", "both"], default="folder")
    parser.add_argument("--backend", choices=["dali", "torch", "all"], default="all")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--batch", type=int, default=32, help="unlabeled images per batch")
    parser.add_argument("--threads", type=int, nargs="+", default=[2],
                        help="DALI threads = DataLoader workers; several (--threads 1 2): a row each, the images/s "
                             "per thread and the parallel efficiency (images/s at N / (N x at the fewest))")
    parser.add_argument("--iters", type=int, default=40, help="timed batches")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--strong", choices=["simclr", "randaugment"], default="simclr")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds (backends and formats alternate within a round); the median is reported")
    parser.add_argument("--open-delay-ms", type=float, nargs="+", default=[0.0], metavar="D",
                        help="injected sleep per open of a data file (LD_PRELOAD shim, benchmarks/open_delay.c): "
                             "a stand-in for a network file system's per-open cost, not a real mount; "
                             "several values: one row each")
    parser.add_argument("--no-opens", action="store_true", help="skip the strace run that counts opens")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides of the stream, e.g. data.jitter_prob=0 (what a view's parts cost)")
    parser.add_argument("--ctaugment", action="store_true",
                        help="then a CTAugment policy on each strong view, on the CPU (ReMixMatch)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    formats = ["folder", "shards"] if args.format == "both" else [args.format]
    if "folder" in formats and not args.data:
        raise ConfigError(f"--format {args.format} needs --data (the image tree)")
    if "shards" in formats and not args.shards:
        raise ConfigError(f"--format {args.format} needs --shards (the folder tools/make_shards.py wrote)")
    args.data = os.path.abspath(args.data) if args.data else None
    args.shards = os.path.abspath(args.shards) if args.shards else None
    if any(t < 1 for t in args.threads):
        raise ConfigError(f"--threads {' '.join(map(str, args.threads))}: each must be at least 1")
    args.threads = sorted(set(args.threads))
    most = args.threads[-1]  # the ratios between backends and formats, and the traced run, use the most threads
    if any(d < 0 for d in args.open_delay_ms):
        raise ConfigError("--open-delay-ms must not be negative")
    backends = ["dali", "torch"] if args.backend == "all" else [args.backend]

    if args.child:
        print(json.dumps(measure(args.data, formats[0], args.shards, backends[0], args.device, args.batch,
                                 args.threads[0], args.iters, args.warmup, args.crop, args.strong,
                                 args.ctaugment, args.set)))
        return 0

    prefix = {"folder": args.data, "shards": args.shards}
    delays = list(dict.fromkeys(args.open_delay_ms))
    tmp = tempfile.mkdtemp(prefix="loader-bench-")
    try:
        shim = build_shim(tmp) if any(d > 0 for d in delays) else None
        runs: dict[tuple, list[dict]] = {}
        load_before = os.getloadavg()  # the 1-minute load average around the timed children: what else ran
        for _ in range(max(1, args.repeat)):
            for d in delays:
                for b, f, t in itertools.product(backends, formats, args.threads):
                    extra = {}
                    if d > 0:
                        preload = os.environ.get("LD_PRELOAD")
                        extra = {"LD_PRELOAD": shim + (" " + preload if preload else ""),
                                 "OPEN_DELAY_MS": f"{d:g}", "OPEN_DELAY_PREFIX": prefix[f]}
                    r = run_child(child_command(args, b, f, t), child_env(extra),
                                  f"{b}/{f} at {d:g} ms, {t} threads")
                    runs.setdefault((b, f, d, t), []).append(r)
        load_after = os.getloadavg()
        strace = shutil.which("strace")
        opens: dict[tuple, tuple] = {}
        opens_note = ("--no-opens" if args.no_opens else "strace not found") if args.no_opens or not strace else ""
        if not opens_note:
            for b in backends:
                for f in formats:
                    trace = os.path.join(tmp, f"{b}-{f}.strace")
                    cmd = [strace, "-f", "-qq", "-y", "--seccomp-bpf", "-e", "trace=open,openat", "-o", trace,
                           *child_command(args, b, f, most)]
                    try:
                        run_child(cmd, child_env(), f"{b}/{f} under strace")
                    except DataError as exc:  # e.g. ptrace not permitted in a container
                        opens_note = f"strace failed: {exc}"
                        opens.clear()
                        break
                    opens[(b, f)] = count_opens(trace, prefix[f], REPO)
                if opens_note:
                    break
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    shard_counts: dict = {}
    if args.shards:
        from simmatch.shards.index import read_index

        shard_counts["shards"] = len(read_index(args.shards, "train").shards)
    rows = []
    for (b, f, d, _t), rs in runs.items():
        row = dict(rs[0])
        row["open_delay_ms"] = d
        row["runs_images_per_s"] = [r["images_per_s"] for r in rs]
        row["images_per_s"] = round(statistics.median(row["runs_images_per_s"]), 1)
        row["cpu_ms_per_image"] = round(statistics.median(r["cpu_ms_per_image"] for r in rs), 2)
        row["cores_busy"] = round(statistics.median(r["cores_busy"] for r in rs), 2)
        del row["seconds"]
        if "shard_opens_this_process" in row:
            row["shard_opens_this_process"] = [r["shard_opens_this_process"] for r in rs]
        images = args.batch * args.iters
        timed, whole = opens.get((b, f), (None, None))
        row["opens"] = timed
        row["opens_per_1k_images"] = None if timed is None else round(1000 * timed / images, 2)
        # the timed rate scaled to one pass over the unlabeled set (an epoch-equivalent)
        row["opens_per_epoch"] = None if timed is None else round(timed * row["epoch_images"] / images, 1)
        # the strace'd child from start to exit: tree scan or index and shard check, warm-up, timed batches
        row["opens_whole_run"] = whole
        row["whole_run_images"] = args.batch * (args.warmup + args.iters)
        row["opens_counted_by"] = "strace" if (b, f) in opens else None
        rows.append(row)
    rows.sort(key=lambda r: (r["open_delay_ms"], backends.index(r["backend"]), formats.index(r["format"]),
                             r["threads"]))
    for r in rows:
        r["images_per_s_per_thread"] = round(r["images_per_s"] / r["threads"], 1)
        r["busy_per_thread"] = round(r["cores_busy"] / r["threads"], 2)  # CPU utilisation per thread

    def cell(v, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    if any(d > 0 for d in delays):
        print("open delay: INJECTED by an LD_PRELOAD shim (benchmarks/open_delay.c) sleeping that many ms in "
              "each open of a data file; a stand-in for a network file system, not a real network mount")
    if opens_note:
        print(f"opens: not counted ({opens_note}): n/a")
    else:
        print(f"opens: open/openat calls under the data tree or shard folder during the {args.iters} timed "
              f"batches ({args.batch * args.iters} images), by strace -f, in a separate run without delay; "
              f"per epoch: that rate over the unlabeled set; whole run: the traced process from start to exit")
    print(f"{'backend':<8} {'format':<7} {'delay-ms':>8} {'device':<6} {'batch':>5} {'threads':>7} {'crop':>4} "
          f"{'img/s':>8} {'/thread':>7} {'cpu-ms/img':>10} {'busy':>5} {'/thread':>7} "
          f"{'opens':>6} {'opens/1k':>8} {'/epoch':>7} {'whole':>6}")
    for r in rows:
        print(f"{r['backend']:<8} {r['format']:<7} {r['open_delay_ms']:>8g} {r['device']:<6} {r['batch']:>5} "
              f"{r['threads']:>7} {r['crop']:>4} {r['images_per_s']:>8.1f} {r['images_per_s_per_thread']:>7.1f} "
              f"{r['cpu_ms_per_image']:>10.2f} {r['cores_busy']:>5.2f} {r['busy_per_thread']:>7.2f} "
              f"{cell(r['opens'], 'd'):>6} {cell(r['opens_per_1k_images'], '.1f'):>8} "
              f"{cell(r['opens_per_epoch'], '.1f'):>7} {cell(r['opens_whole_run'], 'd'):>6}")
    load = {"before": round(load_before[0], 2), "after": round(load_after[0], 2), "cores": os.cpu_count()}
    print(f"load average (1 min): {load['before']} before, {load['after']} after, on {load['cores']} cores")
    result: dict = {"rows": rows, "load_average": load, "open_delay_ms": delays, "open_delay": "injected (LD_PRELOAD "
                    "sleep per open), "
                    "not a real network mount", "opens_counted_by": "strace" if opens else None}
    if opens_note:
        result["opens_note"] = opens_note
    result.update(summarize([r for r in rows if r["threads"] == most], most, shard_counts))
    result.update(scaling(rows))
    for k, eff in result.get("parallel_efficiency", {}).items():
        print(f"parallel efficiency ({k}): {eff:.2f} (images/s at {k.rsplit('@', 1)[1]} threads / that many x at "
              f"{args.threads[0]})")
    for k, ratio in result.get("dali_over_torch_by", {}).items():
        print(f"DALI/torch ({k}): {ratio:.2f}x images/s, "
              f"{result['dali_over_torch_cpu_by'][k]:.2f}x images per CPU-second")
    for b, per_delay in result.get("shards_over_folder", {}).items():
        for d, ratio in per_delay.items():
            print(f"shards/folder ({b}, {d} ms): {ratio:.2f}x images/s, "
                  f"{result['shards_over_folder_cpu'][b][d]:.2f}x images per CPU-second")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from simmatch.launch.process import run_cli

    run_cli(main)
