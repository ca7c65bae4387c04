"""Fixtures of the SLURM tests: a real local cluster, a stand-in trainer, job helpers.

Use from a test module with `from conftest_slurm import *` style imports of the names
needed (tests/ is on sys.path under pytest). The cluster is started once per session by
slurm/local_cluster.sh (installing Debian's packages when missing) and left running, so a
second session starts in about a second; `slurm/local_cluster.sh stop` tears it down.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_SH = ROOT / "slurm" / "local_cluster.sh"
SLURM_DIR = os.environ.get("SIMMATCH_SLURM_DIR", "/tmp/simmatch-slurm")
# 4 emulated nodes: the jobs of 3+ ranks (where the order of gradient sums matters) run on as many
# nodes; most jobs take 2 of them
NODES = 4


def _cannot_install_reason() -> str | None:
    """Why SLURM cannot run here (skip), or None. Only a missing root/apt is a reason."""
    have = all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))
    if have and os.geteuid() == 0:
        return None
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (it starts slurmctld/slurmd/munged)"
    if not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install it"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> dict[str, str]:
    """A running local cluster of NODES nodes; the environment variables that reach it."""
    reason = _cannot_install_reason()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, SIMMATCH_SLURM_DIR=SLURM_DIR)
    proc = subprocess.run(["bash", str(CLUSTER_SH), "start", str(NODES)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"local cluster did not start:\n{proc.stdout}\n{proc.stderr}"
    return {"SLURM_CONF": f"{SLURM_DIR}/slurm.conf"}


@pytest.fixture
def slurm_env(slurm_cluster, monkeypatch) -> dict[str, str]:
    """Environment (also for child processes) that talks to the local cluster."""
    for k, v in slurm_cluster.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return dict(os.environ)


# --------------------------------------------------------------------------- helpers


def run_tool(script: str, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def events(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "submissions.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def metrics_iteration(run_dir: Path) -> int:
    """Highest iteration logged to metrics.jsonl so far (-1 before any)."""
    path = Path(run_dir) / "metrics.jsonl"
    best = -1
    if path.exists():
        for ln in path.read_text().splitlines():
            try:
                best = max(best, int(json.loads(ln)["iteration"]))
            except (ValueError, KeyError):
                pass
    return best


def job_log_tail(run_dir: Path, n: int = 40) -> str:
    out = []
    for p in sorted((Path(run_dir) / "slurm").glob("*_log.*")):
        out.append(f"==> {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-n:]))
    return "\n".join(out)


# --------------------------------------------------------------------------- a stand-in trainer


@dataclass
class FakeResult:
    status: str
    iteration: int
    signum: int | None = None
    metrics: dict = field(default_factory=dict)


def fake_run(cfg_path: str | None, overrides: list[str]) -> FakeResult:
    """simmatch.train.run's contract in miniature, for testing the launcher alone.

    A gloo group, a counter 'trained' each step, a JSON 'checkpoint' every 5 steps; SIGTERM
    or USR2 set a flag that the ranks agree on with an all-reduce, save and return
    "interrupted"; a restart resumes from the newest checkpoint. Overrides: train.run_dir,
    optim.iters, fake.step_s.
    """
    import torch
    import torch.distributed as dist

    opts = dict(o.split("=", 1) for o in overrides)
    run_dir = Path(opts["train.run_dir"])
    iters, step_s = int(opts.get("optim.iters", 20)), float(opts.get("fake.step_s", 0.2))
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("gloo")
    box: dict = {"sig": None}

    def handle(signum, _frame):
        box["sig"] = box["sig"] or signum

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGUSR2)}
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    found = sorted(ckpts.glob("ckpt_*.pt"))
    state = json.loads(found[-1].read_text()) if found else {"iteration": 0, "value": 1}

    def save():
        if rank == 0:
            tmp = ckpts / ".tmp"
            tmp.write_text(json.dumps(state))
            os.replace(tmp, ckpts / f"ckpt_{state['iteration']:09d}.pt")

    status = "finished"
    try:
        while state["iteration"] < iters:
            time.sleep(step_s)
            state["value"] = (state["value"] * 31 + state["iteration"]) % 1000003
            state["iteration"] += 1
            if rank == 0:
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"iteration": state["iteration"], "kind": "train"}) + "\n")
            flag = torch.tensor([float(box["sig"] or 0)])
            if world > 1:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0:
                box["sig"] = box["sig"] or int(flag.item())
                save()
                status = "interrupted"
                break
            if state["iteration"] % 5 == 0 or state["iteration"] == iters:
                save()
        if world > 1:
            dist.barrier()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if world > 1:
            dist.destroy_process_group()
    return FakeResult(status, state["iteration"], box["sig"], {"value": state["value"]})

