"""Pinned (page-locked) host memory of a rank: what DALI's GPU decoders reserve, what torch's
pinned allocator holds, and what the kernel reports, against the node's memory."""
from __future__ import annotations

import os

import torch

from simmatch.selftest.report import FAIL, PASS, SKIP, Check

DECODERS = 3  # labeled, unlabeled, validation: one GPU decoder each per rank
MIB = 1 << 20


def _proc_status_kib(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def node_memory_bytes() -> int:
    """The job's memory per node where SLURM says it, else the machine's."""
    if os.environ.get("SLURM_MEM_PER_NODE", "").isdigit():
        return int(os.environ["SLURM_MEM_PER_NODE"]) * MIB
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def check_pinned(data_cfg, cuda: bool, tasks_per_node: int) -> Check:
    """Report the pinned memory; FAIL when a node's ranks would pin over half of its memory."""
    from dali_pipelines.common import dali_pinned_estimate

    name = "pinned memory"
    dali = dali_pinned_estimate(data_cfg, DECODERS)
    how = (f"{DECODERS} decoders x {data_cfg.num_threads} threads x 2 x {data_cfg.host_padding_mb} MiB "
           f"(data.host_padding_mb), estimated: DALI reports no pinned-memory figure")
    if not cuda:
        return Check(name, SKIP, f"no CUDA, nothing is pinned; on a GPU node each rank's DALI "
                                 f"decoders would pin about {dali / MIB:.0f} MiB ({how})",
                     "run on a GPU node")
    stats = torch.cuda.host_memory_stats()
    torch_now, torch_peak = stats.get("allocated_bytes.current", 0), stats.get("allocated_bytes.peak", 0)
    locked = (_proc_status_kib("VmPin") + _proc_status_kib("VmLck")) * 1024
    per_rank = dali + torch_peak
    node, total = per_rank * tasks_per_node, node_memory_bytes()
    text = (f"per rank: DALI decoders ~{dali / MIB:.0f} MiB ({how}); torch pinned allocator "
            f"{torch_now / MIB:.0f} MiB now, {torch_peak / MIB:.0f} MiB peak; kernel VmPin+VmLck "
            f"{locked / MIB:.0f} MiB. Per node ({tasks_per_node} ranks): ~{node / 2**30:.1f} GiB of "
            f"{total / 2**30:.0f} GiB")
    if total and node > total / 2:
        return Check(name, FAIL, text, "lower data.host_padding_mb or data.num_threads, or ask "
                                       "for more --mem")
    return Check(name, PASS, text)
