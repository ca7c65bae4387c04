"""The self-test's options (no torch import: tools/submit.py checks them at submit time)."""
from __future__ import annotations

import argparse

CHECKS = ("driver", "nvjpeg decode", "cpu decode", "val stream", "train streams", "collectives",
          "bank all-gather", "train step", "throughput", "pinned memory")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        from simmatch.errors import ConfigError

        raise ConfigError(f"selftest: {message}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="selftest", description="Check the GPU (or CPU) path of this "
                                "machine in minutes: one PASS/FAIL/SKIP line per check.")
    p.add_argument("--data", help="ImageNet-style tree (train/<class>/, val/<class>/) whose first "
                                  "images are checked; default: sample JPEGs written to a temporary folder")
    p.add_argument("--threads", type=int, default=0, help="DALI threads per pipeline (default 4 on a "
                                                          "GPU, 1 on a CPU)")
    p.add_argument("--skip", default="", help="comma-separated checks not to run, e.g. throughput")
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (ranks joined by "
                                                        "NCCL on GPUs, gloo on CPUs)")
    args = p.parse_args(argv)
    args.skipped = {n.strip().replace(" ", "-") for n in args.skip.split(",") if n.strip()}
    unknown = sorted(args.skipped - {c.replace(" ", "-") for c in CHECKS})
    if unknown:
        from simmatch.errors import ConfigError

        raise ConfigError(f"--skip {', '.join(unknown)}: no such check (checks: "
                          f"{', '.join(c.replace(' ', '-') for c in CHECKS)})")
    return args


