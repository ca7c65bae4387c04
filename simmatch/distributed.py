"""Rank, world size and collectives that also work in a single process with no process group."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def local_device_index(device_count: int | None = None) -> int:
    """This task's CUDA device: LOCAL_RANK modulo the devices the task can see.

    Where a site binds one GPU per task (CUDA_VISIBLE_DEVICES set per task by SLURM), every
    task sees a single device 0 while LOCAL_RANK runs up to 7: cuda:LOCAL_RANK would be an
    "invalid device ordinal" there. `device_count` defaults to torch.cuda.device_count().
    """
    count = torch.cuda.device_count() if device_count is None else device_count
    if count < 1:
        raise RuntimeError("no CUDA device is visible to this process")
    return local_rank() % count


def is_main() -> bool:
    return rank() == 0


def init(backend: str | None = None, timeout_s: int = 1800) -> None:
    """Join the process group described by the torchrun/SLURM environment, if there is one.

    NCCL when CUDA is available, gloo otherwise. A single process without WORLD_SIZE stays
    without a process group: every helper below then acts as the identity.
    """
    if is_dist() or int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_device_index())
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def shutdown() -> None:
    if is_dist():
        dist.destroy_process_group()


def barrier() -> None:
    if is_dist():
        dist.barrier()


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0 (same shape on every rank), rank order."""
    if not is_dist() or world_size() == 1:
        return tensor
    out = torch.empty((world_size() * tensor.shape[0], *tensor.shape[1:]),
                      dtype=tensor.dtype, device=tensor.device)
    dist.all_gather_single(out, tensor.contiguous())
    return out


@torch.no_grad()
def all_gather_uneven(tensor: torch.Tensor) -> torch.Tensor:
    """Like `all_gather_cat` when ranks hold different numbers of rows (padded, then trimmed)."""
    if not is_dist() or world_size() == 1:
        return tensor
    sizes = [int(n) for n in all_gather_objects(int(tensor.shape[0]))]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = all_gather_cat(padded).split(max(sizes))
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)])


@torch.no_grad()
def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, returned as a new tensor (the input is left as it was)."""
    if not is_dist() or world_size() == 1:
        return tensor.clone()
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size()


@torch.no_grad()
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    out = tensor.clone()
    if is_dist() and world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every rank."""
    if not is_dist() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_tensors(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Rank `src`'s values of `tensors` (same shapes on every rank) copied into every rank's, in
    place, in one collective."""
    if not is_dist() or world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.broadcast(flat, src=src)
    torch._foreach_copy_(tensors, [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors)])


def all_gather_objects(obj) -> list:
    """Every rank's picklable object, in rank order (a one-element list without a group)."""
    if not is_dist() or world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def average_buffers(module: torch.nn.Module) -> None:
    """Average floating buffers (BN running statistics) over ranks, in place, in one collective,
    so that every rank's copy, and the EMA teacher that follows it, stays identical."""
    if not is_dist() or world_size() == 1:
        return
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    if not bufs:
        return
    flat = torch.cat([b.reshape(-1) for b in bufs])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    torch._foreach_copy_(bufs, list(flat.split([b.numel() for b in bufs])))


def bn_group(group_ranks: int):
    """The process group of this rank's BN group: consecutive ranks [g*k, g*(k+1)), so that a
    group stays within a node where it can. A collective (every rank creates every group);
    None without a process group or for groups of one rank."""
    if group_ranks <= 1 or not is_dist():
        return None
    if world_size() % group_ranks:
        raise ValueError(f"BN groups of {group_ranks} ranks do not divide the world size {world_size()}")
    if group_ranks == world_size():
        return dist.group.WORLD
    mine, _ = dist.new_subgroups(group_size=group_ranks)
    return mine


# --------------------------------------------------------------------------- shuffle-BN

def shuffle_permutation(total: int, seed: int, step: int) -> torch.Tensor:
    """The permutation of a global batch of `total` samples used at `step`: a pure function
    of (seed, step), so every rank draws the same one without a broadcast and a resumed run
    draws the one an uninterrupted run would. CPU int64."""
    g = torch.Generator().manual_seed(int(seed) * 2**32 + int(step))
    return torch.randperm(total, generator=g)


@dataclass
class ShufflePlan:
    """Which rows this rank sends where, and where received rows go, for one permutation.

    Global sample i lives on rank i // n at row i % n (n rows per rank, rank order). After the
    shuffle, rank r holds the samples perm[r*n : (r+1)*n], in that order: exactly MoCo's
    `_batch_shuffle_ddp` (all-gather, then x_all[perm.view(W, n)[r]]), but each sample
    crosses the network once, in one all_to_all.
    """

    send_index: torch.Tensor  # local rows, grouped by destination rank (rank order), each in position order
    send_counts: list[int]
    recv_order: torch.Tensor  # shuffled-batch position of each received row
    recv_counts: list[int]


def shuffle_plan(perm: torch.Tensor, rank_: int, world: int, device: torch.device | str = "cpu") -> ShufflePlan:
    n = perm.numel() // world
    if n * world != perm.numel():
        raise ValueError(f"shuffle-BN needs equal batches on every rank ({perm.numel()} over {world})")
    block = perm.view(world, n)
    src = torch.div(block, n, rounding_mode="floor")  # source rank of each shuffled position
    mine = src == rank_
    send_index = block[mine] - rank_ * n  # row-major: destination rank, then position
    recv_src = src[rank_]
    recv_order = torch.sort(recv_src, stable=True).indices  # received rows come grouped by source
    return ShufflePlan(send_index.to(device, non_blocking=True), mine.sum(dim=1).tolist(),
                       recv_order.to(device, non_blocking=True),
                       torch.bincount(recv_src, minlength=world).tolist())


def _exchange(rows: torch.Tensor, out_rows: int, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
    out = rows.new_empty((out_rows, *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), output_split_sizes=recv_counts,
                           input_split_sizes=send_counts)
    return out


@torch.no_grad()
def batch_shuffle(x: torch.Tensor, plan: ShufflePlan) -> torch.Tensor:
    """This rank's share of the globally permuted batch (see `ShufflePlan`)."""
    received = _exchange(x[plan.send_index], x.shape[0], plan.send_counts, plan.recv_counts)
    out = torch.empty_like(received)
    out[plan.recv_order] = received
    return out


@torch.no_grad()
def batch_unshuffle(y: torch.Tensor, plan: ShufflePlan) -> torch.Tensor:
    """Outputs of the shuffled batch sent back to the ranks and rows their inputs came from."""
    received = _exchange(y[plan.recv_order], y.shape[0], plan.recv_counts, plan.send_counts)
    out = torch.empty_like(received)
    out[plan.send_index] = received
    return out
