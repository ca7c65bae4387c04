"""Which items each rank reads in each epoch: one global order, cut into per-rank batches.

Epoch e shuffles all N items with a generator seeded from (seed, stream tag, e) — the same on
every rank — and repeats the permutation cyclically up to a whole number of global batches
(so every batch is full and nothing is dropped), or with `drop_last` cuts it to
floor(N / global batch) batches (the authors' drop_last; the next epoch reshuffles). Global
step s reads the contiguous chunk [s*B*W, (s+1)*B*W) of that order; rank r takes the r-th
B-slice of it. The global sequence of batches therefore does not depend on the world size, and
ranks share no item within a step unless the set is smaller than the global batch (40 labels at 64
a step: the padding repeats items, so a step may hold one twice; the labeled bank writes each slot
once, the last row). Augmentation randomness is seeded from the GLOBAL rank.

Elastic resume: a run continued on another world size (or per-rank batch) goes on from the
first item of the epoch's permutation that no rank has consumed (`tail_offset` items of epoch
`tail_epoch` are behind it). That epoch's remaining items are cut into batches of the new
layout, padded (or dropped) like any epoch's last batch; later epochs are whole again.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from simmatch.config import steps_per_epoch

# Stream tags keep the labeled and unlabeled orders (and seeds) independent.
LABELED, UNLABELED = 1, 2


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers (DALI and torch both accept it)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


@dataclass(frozen=True)
class ShardPlan:
    num_items: int
    batch_size: int  # per rank
    rank: int
    world_size: int
    seed: int
    tag: int
    drop_last: bool = False
    tail_epoch: int = -1  # elastic resume: this epoch starts at item `tail_offset` of its order
    tail_offset: int = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        """Batches of a whole epoch (every epoch but an elastic resume's first)."""
        return steps_per_epoch(self.num_items, self.global_batch, "drop" if self.drop_last else "pad")

    def offset(self, epoch: int) -> int:
        """Items of `epoch`'s permutation read before this layout took over (0 but in the tail)."""
        return self.tail_offset if epoch == self.tail_epoch else 0

    def batches_in(self, epoch: int) -> int:
        """Batches of `epoch`: whole, or what is left of it after `tail_offset` items (which
        may be none with drop_last)."""
        offset = self.offset(epoch)
        if offset == 0:
            return self.batches_per_epoch
        left = self.num_items - offset
        return left // self.global_batch if self.drop_last else -(-left // self.global_batch)

    def global_order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of all items from its offset on, cyclically padded (or cut)
        to whole global batches."""
        rng = np.random.default_rng([self.seed, self.tag, epoch])
        perm = rng.permutation(self.num_items)
        offset = self.offset(epoch)
        return np.resize(perm, offset + self.batches_in(epoch) * self.global_batch)[offset:]

    def rank_order(self, epoch: int) -> np.ndarray:
        """The items this rank reads in `epoch`, in order (batches_in(epoch) * batch_size)."""
        order = self.global_order(epoch).reshape(self.batches_in(epoch), self.world_size,
                                                 self.batch_size)
        return np.ascontiguousarray(order[:, self.rank, :]).reshape(-1)

    def consumed(self, epoch: int, batch: int) -> int:
        """Items of `epoch`'s permutation that all ranks together have read before `batch`."""
        return self.offset(epoch) + batch * self.global_batch

    def fingerprint(self) -> dict:
        """What must match for a saved position to mean the same batches after a resume."""
        out = {"num_items": self.num_items, "batch_size": self.batch_size, "rank": self.rank,
               "world_size": self.world_size, "seed": self.seed, "tag": self.tag}
        if self.drop_last:  # absent when false, so positions saved before the option still match
            out["drop_last"] = True
        if self.tail_epoch >= 0:  # absent unless the run has been resumed on another layout
            out["tail_epoch"], out["tail_offset"] = self.tail_epoch, self.tail_offset
        return out

    def same_items(self, fingerprint: dict) -> bool:
        """A saved position of the same item sequence (any world size or per-rank batch)."""
        mine = self.fingerprint()
        return all(fingerprint.get(k) == mine.get(k) for k in ("num_items", "seed", "tag", "drop_last"))

    def with_tail(self, epoch: int, offset: int) -> ShardPlan:
        return dataclasses.replace(self, tail_epoch=epoch, tail_offset=offset)

    @staticmethod
    def tail_of(fingerprint: dict) -> tuple[int, int]:
        return int(fingerprint.get("tail_epoch", -1)), int(fingerprint.get("tail_offset", 0))


def val_slice(num_items: int, rank: int, world_size: int) -> tuple[int, int]:
    """Disjoint contiguous [start, stop) of the validation list for `rank`; together exact."""
    return num_items * rank // world_size, num_items * (rank + 1) // world_size
