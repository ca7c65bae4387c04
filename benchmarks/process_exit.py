#!/usr/bin/env python
"""What a process that imported torch pays to end: the interpreter's own exit against run_cli's.

Each measurement is a fresh child that imports torch and torchvision (as every rank and most
tools do), builds an SGD optimizer (which imports torch._dynamo), prints the time, and returns
from main; the parent notes when the child has exited. `exit` is that gap (the module teardown),
`start` the child's time from its first line to the print. Modes: `plain` (sys.exit: the
interpreter tears every module down), `run_cli` (simmatch/launch/process.py: the same imports
with the collector off and frozen, then os._exit after threads, atexit and a flush).

Prints a table and, as its last line, one JSON object.

    python benchmarks/process_exit.py --repeat 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from simmatch.errors import ConfigError, DataError, cli_errors  # noqa: E402

CHILD = """
import sys, time
t0 = time.time()
sys.path.insert(0, {repo!r})
def main():
    import torch, torchvision  # noqa: F401
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    print(time.time() - t0, time.time(), flush=True)
if {mode!r} == "run_cli":
    from simmatch.launch.process import run_cli
    run_cli(main, heavy=("torch", "torchvision"))
else:
    sys.exit(main())
"""


def measure(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD.format(repo=REPO, mode=mode)], capture_output=True, text=True)
    ended = time.time()
    if proc.returncode != 0:
        raise DataError(f"the {mode} child failed (exit {proc.returncode}): {proc.stderr[-1000:]}")
    start_s, printed = map(float, proc.stdout.split())
    return {"start_s": start_s, "exit_s": ended - printed}


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="children per mode (alternating); medians reported")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        raise ConfigError(f"--repeat {args.repeat}: need at least 1")
    runs: dict[str, list[dict]] = {"plain": [], "run_cli": []}
    for _ in range(args.repeat):
        for mode in runs:
            runs[mode].append(measure(mode))
    result = {"benchmark": "process_exit", "repeat": args.repeat}
    print(f"{'mode':<8} {'start s':>8} {'exit s':>7}  (medians of {args.repeat}; exit runs: ...)")
    for mode, rs in runs.items():
        start = statistics.median(r["start_s"] for r in rs)
        exits = [round(r["exit_s"], 3) for r in rs]
        result[mode] = {"start_s": round(start, 3), "exit_s": round(statistics.median(exits), 3), "exit_runs_s": exits}
        print(f"{mode:<8} {start:>8.2f} {statistics.median(exits):>7.2f}  {exits}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from simmatch.launch.process import run_cli

    run_cli(main)
