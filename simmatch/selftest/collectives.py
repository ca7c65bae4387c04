"""All-gather and all-reduce over every rank of the job (NCCL on GPUs, gloo on CPUs), and the
labeled bank's all-gathered update, each against its known answer."""
from __future__ import annotations

import time

import torch
import torch.distributed as tdist

from simmatch import distributed as dist
from simmatch.selftest.report import FAIL, PASS, Check

FIX = "check the network between the nodes (NCCL_DEBUG=INFO shows the transport) and that every " \
      "rank sees its GPU"


def check_collectives(device: torch.device, megabytes: int) -> Check:
    """The equal-size all-gather, all_reduce (sum) and an uneven all-gather, through
    torch.distributed directly (so a 1-rank group is exercised too), plus all-reduce bandwidth."""
    name = "collectives"
    world, rank = tdist.get_world_size(), tdist.get_rank()
    backend = tdist.get_backend()
    mine = torch.arange(4, dtype=torch.float32, device=device) + 100 * rank
    gathered = torch.empty(4 * world, device=device)
    tdist.all_gather_single(gathered, mine)
    expected = torch.cat([torch.arange(4, dtype=torch.float32) + 100 * r for r in range(world)])
    problems = []
    if not torch.equal(gathered.cpu(), expected):
        problems.append(f"all_gather gave {gathered.cpu().tolist()[:8]}, expected {expected.tolist()[:8]}")
    total = torch.full((3,), float(rank + 1), device=device)
    tdist.all_reduce(total)
    if not torch.equal(total.cpu(), torch.full((3,), world * (world + 1) / 2)):
        problems.append(f"all_reduce gave {total.cpu().tolist()}, expected {world * (world + 1) / 2}")
    rows = torch.full((rank + 1, 2), float(rank), device=device)  # rank r holds r+1 rows
    uneven = dist.all_gather_uneven(rows).cpu()
    want = torch.cat([torch.full((r + 1, 2), float(r)) for r in range(world)])
    if not torch.equal(uneven, want):
        problems.append(f"uneven all-gather gave {uneven.shape[0]} rows, expected {want.shape[0]}")
    numel = megabytes * (1 << 20) // 4
    big = torch.ones(numel, device=device)
    tdist.all_reduce(big)  # warm-up (NCCL sets up its rings on the first call)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    tdist.all_reduce(big)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if float(big[0]) != world * world:
        problems.append(f"all_reduce of {megabytes} MiB gave {float(big[0])}, expected {world * world}")
    # bus bandwidth as nccl-tests defines it: bytes x 2(n-1)/n per second
    bus = megabytes * (1 << 20) * 2 * (world - 1) / world / seconds / 1e9 if world > 1 else 0.0
    text = f"{backend}, {world} rank(s): all_gather, all_reduce, uneven all-gather exact; " \
           f"all_reduce {megabytes} MiB in {seconds * 1e3:.1f} ms" + \
           (f" ({bus:.1f} GB/s bus bandwidth)" if world > 1 else "")
    if problems:
        return Check(name, FAIL, f"{backend}, {world} rank(s): {'; '.join(problems)}", FIX)
    return Check(name, PASS, text)


def check_bank(device: torch.device) -> Check:
    """Each rank writes 3 rows of a shared bank; every rank must end with every rank's rows and
    the same bank (the update path of training: LabeledBank.update -> all_gather_cat)."""
    from simmatch.methods.bank import LabeledBank

    name = "bank all-gather"
    world, rank = tdist.get_world_size(), tdist.get_rank()
    k, d = 3 * world + 2, 8
    bank = LabeledBank(k, d, torch.zeros(k, dtype=torch.long)).to(device)
    before = bank.features.clone()
    idx = torch.arange(3 * rank, 3 * rank + 3, device=device)
    feats = torch.nn.functional.normalize(
        torch.arange(3 * d, dtype=torch.float32, device=device).view(3, d) + 10 * rank + 1, dim=1)
    bank.update(feats, torch.full((3,), rank + 1, device=device), idx)
    expected = before.cpu().clone()
    labels = torch.zeros(k, dtype=torch.long)
    for r in range(world):
        rows = torch.arange(3 * d, dtype=torch.float32).view(3, d) + 10 * r + 1
        expected[3 * r:3 * r + 3] = torch.nn.functional.normalize(rows, dim=1)
        labels[3 * r:3 * r + 3] = r + 1
    problems = []
    if not torch.allclose(bank.features.cpu(), expected, atol=1e-6) or not torch.equal(bank.labels.cpu(), labels):
        problems.append("this rank's bank misses or misplaces other ranks' rows")
    sums = dist.all_gather_objects(float(bank.features.double().sum()))
    if len(set(sums)) != 1:
        problems.append(f"banks differ between ranks (feature sums {sums[:4]})")
    if problems:
        return Check(name, FAIL, "; ".join(problems), FIX)
    return Check(name, PASS, f"{world} rank(s) x 3 rows into a bank of {k}: every rank holds every "
                             "rank's rows, banks identical")
