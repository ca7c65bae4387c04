"""Start N training processes on this machine (one per GPU, or N CPU processes with gloo).

The parent validates the config once, gives each child RANK/WORLD_SIZE/LOCAL_RANK and a
free MASTER_PORT, forwards SIGTERM/SIGUSR2/SIGINT to them, and stops the others soon after
one fails (`SIBLING_GRACE_S`: ranks that stop together, as on a data error every rank agreed
on, end by themselves) so that no rank waits forever in a collective.

The children die with the launcher, as torchrun's do: each asks the kernel for SIGTERM when
its parent dies (prctl PR_SET_PDEATHSIG, Linux), so a SIGKILLed launcher leaves no orphaned
ranks training into the run directory; SIGTERM lets them save and exit. They run in their
own process group, so a Ctrl-C in the terminal reaches the launcher once and is forwarded
once (a second Ctrl-C then aborts them). A rank that has not exited `ORPHAN_GRACE_S` seconds
after its launcher died (stuck in a collective whose peer is gone) ends itself.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from simmatch.config import derive_scale, load_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PR_SET_PDEATHSIG = 1
LAUNCHER_PID = "SIMMATCH_LAUNCHER_PID"
ORPHAN_GRACE_S = 60.0
SIBLING_GRACE_S = 10.0  # after one rank fails, how long the others may take to end by themselves


def watch_launcher(grace_s: float = ORPHAN_GRACE_S) -> None:
    """In a rank started by `launch`: exit `grace_s` after the launcher died if the SIGTERM
    it got (finish the step, save, exit) has not ended it by then."""
    parent = int(os.environ.get(LAUNCHER_PID, "0"))
    if not parent:
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        time.sleep(grace_s)
        print(f"rank {os.environ.get('RANK', '?')}: launcher gone for {grace_s:.0f} s, exiting",
              file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def _die_with(parent: int) -> Callable[[], None]:
    """Run in the child between fork and exec: own process group, SIGTERM on the parent's death."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    except (OSError, AttributeError):  # not Linux: the launcher's signal forwarding remains
        prctl = None

    def setup() -> None:
        os.setpgid(0, 0)
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)

    return setup


def cpu_cores() -> int:
    """The cores this process may run on (the affinity mask, as under SLURM or taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def child_env(base: dict, rank: int, nproc: int, port: int) -> dict:
    """A child's environment: its rank, the rendezvous, and OMP_NUM_THREADS = cores // nproc
    unless the user set it. Without it every child starts one thread per core and N children
    oversubscribe the machine (torchrun sets it for the same reason)."""
    env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
               LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               **{LAUNCHER_PID: str(os.getpid())})
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_cores() // nproc)))
    return env


def launch(cfg_path: str, overrides: list[str], nproc: int, flags: list[str] = ()) -> int:
    """Train with `nproc` local processes; the config is judged once here, so that a bad one
    (or train.virtual_world_size that `nproc` does not divide) is one error line, not one per rank."""
    cfg = load_config(cfg_path, overrides)  # a bad config fails here, once, before any child starts
    derive_scale(cfg, nproc)  # batch per rank, BN groups and virtual ranks per process, checked once
    return spawn([sys.executable, "-m", "simmatch.train", "--cfg", cfg_path, *flags, *overrides], nproc)


def spawn(command: list[str], nproc: int) -> int:
    """Run `command` as ranks 0..nproc-1 of one group on this machine; the first failing rank's
    exit code (the others are stopped), else 0."""
    port = free_port()
    children: list[subprocess.Popen] = []
    for r in range(nproc):
        env = child_env(os.environ, r, nproc, port)
        children.append(subprocess.Popen(command, env=env, preexec_fn=_die_with(os.getpid())))

    def forward(signum, _frame):
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)}
    try:
        while True:
            codes = [c.poll() for c in children]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                # the others may be ending on their own (a stop every rank agreed on): let them
                deadline = time.time() + SIBLING_GRACE_S
                while any(c.poll() is None for c in children) and time.time() < deadline:
                    time.sleep(0.1)
                for c in children:
                    if c.poll() is None:
                        c.terminate()
                for c in children:
                    try:
                        c.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        c.kill()
                return failed[0] if failed[0] > 0 else 1
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
