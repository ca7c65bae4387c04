"""Which items each rank reads in each epoch: one global order, cut into per-rank batches.

Epoch e shuffles all N items with a generator seeded from (seed, stream tag, e) — the same on
every rank — and repeats the permutation cyclically up to a whole number of global batches
(so every batch is full and nothing is dropped), or with `drop_last` cuts it to
floor(N / global batch) batches (the authors' drop_last; the next epoch reshuffles). Global step s reads the contiguous chunk
[s*B*W, (s+1)*B*W) of that order; rank r takes the r-th B-slice of it. The global sequence of
batches therefore does not depend on the world size, and ranks never share an item within a
step. Augmentation randomness is seeded from the GLOBAL rank.
"""
from __future__ import annotations

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

    @property
    def batches_per_epoch(self) -> int:
        return steps_per_epoch(self.num_items, self.batch_size * self.world_size,
                               "drop" if self.drop_last else "pad")

    def global_order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of all items, cyclically padded (or cut) to whole global batches."""
        rng = np.random.default_rng([self.seed, self.tag, epoch])
        perm = rng.permutation(self.num_items)
        return np.resize(perm, self.batches_per_epoch * self.batch_size * self.world_size)

    def rank_order(self, epoch: int) -> np.ndarray:
        """The items this rank reads in `epoch`, in order (batches_per_epoch * batch_size)."""
        order = self.global_order(epoch).reshape(self.batches_per_epoch, self.world_size,
                                                 self.batch_size)
        return np.ascontiguousarray(order[:, self.rank, :]).reshape(-1)

    def fingerprint(self) -> dict:
        """What must match for a saved position to mean the same batches after a resume."""
        out = {"num_items": self.num_items, "batch_size": self.batch_size, "rank": self.rank,
               "world_size": self.world_size, "seed": self.seed, "tag": self.tag}
        if self.drop_last:  # absent when false, so positions saved before the option still match
            out["drop_last"] = True
        return out


def val_slice(num_items: int, rank: int, world_size: int) -> tuple[int, int]:
    """Disjoint contiguous [start, stop) of the validation list for `rank`; together exact."""
    return num_items * rank // world_size, num_items * (rank + 1) // world_size
