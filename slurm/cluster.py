"""What the login node can tell about a partition before sbatch: its nodes, CPUs and GPUs.

A job that asks for more nodes than the partition has, or more CPUs or GPUs per node than
its nodes hold, pends forever with only a reason code (PartitionNodeLimit, Resources):
`check_fits` refuses it with one line instead. Read from `scontrol show partition` and
`sinfo`; where they cannot be asked, nothing is refused (SLURM decides).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from simmatch.errors import UserError

_FIELD = re.compile(r"(\w+)=(\S*)")
_GPU = re.compile(r"gpu(?::[^:,()]+)?:(\d+)")


@dataclass
class Partition:
    name: str
    nodes: int  # TotalNodes
    cpus_per_node: int  # the smallest node's CPUs (0: unknown)
    gpus_per_node: int | None  # the smallest node's GPUs (gres gpu); None: unknown


def _run(cmd: list[str]) -> subprocess.CompletedProcess | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None


def partition_info(name: str | None) -> Partition | None:
    """The named partition (or the default one); UserError when SLURM does not know the name,
    None when SLURM cannot be asked."""
    proc = _run(["scontrol", "show", "partition", "-o"])
    if proc is None or proc.returncode != 0:
        return None
    parts = [dict(_FIELD.findall(line)) for line in proc.stdout.splitlines() if line.strip()]
    if name:
        chosen = [p for p in parts if p.get("PartitionName") == name]
        if not chosen:
            known = ", ".join(p.get("PartitionName", "?") for p in parts)
            raise UserError(f"--partition {name}: no such partition on this cluster (partitions: {known})")
    else:
        chosen = [p for p in parts if p.get("Default") == "YES"] or parts[:1]
        if not chosen:
            return None
    part = chosen[0]
    pname = part["PartitionName"]
    nodes = int(part.get("TotalNodes", "0") or 0)
    info = _run(["sinfo", "-h", "-N", "-p", pname, "-o", "%N %c %G"])
    cpus, gpus = [], []
    if info is not None and info.returncode == 0:
        for line in info.stdout.splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                cpus.append(int(fields[1]))
                gres = fields[2] if len(fields) > 2 else ""
                gpus.append(sum(int(n) for n in _GPU.findall(gres)))
    return Partition(pname, nodes, min(cpus) if cpus else 0, min(gpus) if gpus else None)


def check_fits(part: Partition, nodes: int, tasks_per_node: int, cpus_per_task: int | None,
               gpus_per_node: int) -> str:
    """Refuse a job shape that this partition can never run; a one-line summary if it fits."""
    where = f"partition {part.name}"
    if part.nodes and nodes > part.nodes:
        raise UserError(f"--nodes {nodes}: {where} has {part.nodes} node(s); the job would pend forever")
    cpus = tasks_per_node * (cpus_per_task or 1)
    if part.cpus_per_node and cpus > part.cpus_per_node:
        raise UserError(f"{tasks_per_node} task(s) x {cpus_per_task or 1} CPU(s) per node = {cpus} CPUs, "
                        f"but the nodes of {where} have {part.cpus_per_node}; the job would pend forever")
    if part.gpus_per_node is not None and gpus_per_node > part.gpus_per_node:
        raise UserError(f"--gpus-per-node {gpus_per_node}: the nodes of {where} have "
                        f"{part.gpus_per_node} GPU(s); the job would pend forever "
                        f"(--gpus-per-node 0 runs CPU tasks)")
    return (f"{where}: {part.nodes} node(s) x {part.cpus_per_node} CPUs, {part.gpus_per_node} GPUs: "
            f"{nodes} x {tasks_per_node} task(s) fit")
