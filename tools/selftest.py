#!/usr/bin/env python
"""Self-test of this machine's training path, one PASS/FAIL/SKIP line per check, in minutes.

  python tools/selftest.py                       # this process (its GPU, or the CPU checks)
  python tools/selftest.py --nproc 8             # 8 ranks: NCCL between this node's GPUs
  python tools/selftest.py --data /datasets/imagenet   # check your own images too
  python tools/submit.py --selftest --nodes 2    # one short SLURM job on 2 nodes, all ranks

Checks: driver vs DALI wheel, nvJPEG decoding, DALI GPU vs CPU streams (DALI vs torch on a
CPU-only machine), all-gather/all-reduce and the bank all-gather over every rank, a training
step with finite losses, step throughput on synthetic and DALI-fed data, pinned memory.
Exit code 0 only if every check that ran passed.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


from simmatch.errors import cli_errors  # noqa: E402


@cli_errors
def main() -> int:
    from simmatch.selftest.cli import parse_args

    args = parse_args(sys.argv[1:])
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from simmatch.launch.local import spawn

        rest = [a for i, a in enumerate(sys.argv[1:]) if not a.startswith("--nproc")
                and (i == 0 or sys.argv[i] != "--nproc")]
        return spawn([sys.executable, "-m", "simmatch.selftest", *rest], args.nproc)
    from simmatch.selftest.runner import main as run_rank

    return run_rank(sys.argv[1:])


if __name__ == "__main__":
    from simmatch.launch.process import run_cli

    run_cli(main, heavy=("torch", "torchvision"))
