"""What a checkpoint holds of a trainer, and how a trainer takes it back.

Exact resume on the same run (the same ranks, on as many processes or, with virtual ranks, on
others); elastic resume from another number of ranks (simmatch/checkpoint/elastic.py): the
replicated state exactly, the data from the first unread image of the epoch, the iteration in
steps of the new global batch, per-rank random streams derived afresh. A mixin of `Trainer`,
which holds the attributes used here.
"""
from __future__ import annotations

from pathlib import Path

from simmatch import distributed as dist
from simmatch.checkpoint import store
from simmatch.checkpoint.elastic import rescale_iteration
from simmatch.config import derive_at, to_dict
from simmatch.data.sharding import derive_seed
from simmatch.engine import rng
from simmatch.errors import CheckpointError


class TrainerState:
    def _world_entry(self, iteration: int) -> dict:
        entry = {"world_size": self.world, "iteration": iteration}
        if self.processes != self.world:
            entry["processes"] = self.processes
        return entry

    def _rank_states(self, at_mark: bool = False) -> list[dict]:
        """This process's random state and the data position of each rank it runs; `at_mark`: as
        they were before the current step drew (a step whose draw failed is saved as not begun)."""
        state = rng.capture()
        if at_mark:
            state["torch"] = self.rng_at_mark
            return [{"rng": state, **r.state_at_mark()} for r in self.streams.train]
        return [{"rng": state, **r.state_dict()} for r in self.streams.train]

    def state_dict(self, at_mark: bool = False) -> dict:
        """Everything exact resume needs; a collective (every rank's RNG and data position, one
        entry per rank of the run, virtual ones included). `at_mark`: see `_rank_states`."""
        ranks = [entry for mine in dist.all_gather_objects(self._rank_states(at_mark)) for entry in mine]
        # rank 0's own BN statistics (its process writes the checkpoint): the evaluation as the authors'
        own = {"rank0_bn": self.rank0_bn.tensors()} if self.rank0_bn is not None and self.ranks[0] == 0 else {}
        return {
            "format": store.FORMAT,
            "iteration": self.iteration,
            "arch": self.cfg.model.arch,
            "num_classes": self.cfg.data.num_classes,
            "method_name": self.cfg.method.name,
            "world_size": self.world,
            "processes": self.processes,
            "global_batch": self.derived.global_batch,
            "world_history": self.world_history,
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ranks": ranks,
            "config": to_dict(self.cfg),
            "splits": dict(self.streams.split_texts),
            "classes": list(self.streams.classes),  # class names (wnids), index order: for exports
            **own,
        }

    def load_state_dict(self, state: dict, source: Path) -> None:
        """Exact resume on the same world size; on another one, an elastic resume (simmatch/checkpoint/elastic.py):
        the replicated state exactly, the data from the first unread image of the epoch, the
        iteration in steps of the new global batch, per-rank random streams derived afresh."""
        for key, mine in (("arch", self.cfg.model.arch), ("num_classes", self.cfg.data.num_classes),
                          ("method_name", self.cfg.method.name)):
            if state.get(key) != mine:
                raise CheckpointError(f"checkpoint {source} has {key}={state.get(key)!r}, "
                                      f"this run has {mine!r}")
        old_world = int(state.get("world_size") or 0)
        if old_world < 1 or len(state.get("ranks", ())) != old_world:
            raise CheckpointError(f"checkpoint {source} holds no per-rank state for its world size "
                                  f"{state.get('world_size')!r}")
        try:
            self.method.load_state_dict(state["method"])
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {source} does not fit this model: "
                                  f"{str(exc).splitlines()[0]}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        if self.rank0_bn is not None:  # a checkpoint of one rank holds none: rank 0's start from the averaged
            if "rank0_bn" in state:
                self.rank0_bn.load(state["rank0_bn"])
            else:
                self.rank0_bn.reset_to_current()
        self.scaler.load_state_dict(state["scaler"])
        iteration = int(state["iteration"])
        self.world_history = [dict(h) for h in state.get("world_history") or
                              [{"world_size": old_world, "iteration": 0}]]
        old_processes = int(state.get("processes") or old_world)
        if old_world == self.world:  # the same run, on as many processes or (virtual ranks) not
            for r in self.streams.train:
                r.load_state_dict(state["ranks"][r.rank])
            # the random state of the process that ran this process's first rank
            rng.restore(state["ranks"][self.ranks[0]]["rng"])
            self.iteration = iteration
            self.saved_at = iteration  # the checkpoint resumed from is this iteration's
            if old_processes != self.processes:
                self.world_history.append(self._world_entry(iteration))
        else:  # ranks read in lockstep: any rank's position says what the epoch has consumed
            old = derive_at(self.cfg, old_world, self.derived.num_labeled, self.derived.num_unlabeled)
            old_batch = int(state.get("global_batch") or old.global_batch)
            self.iteration = rescale_iteration(iteration, old_batch, self.derived.global_batch)
            if iteration >= old.total_iters:  # finished where it was trained: finished here too
                self.iteration = max(self.iteration, self.derived.total_iters)
            for r in self.streams.train:
                r.load_state_dict(state["ranks"][0])
            rng.seed_all(derive_seed(self.cfg.train.seed, 1000 + self.ranks[0], self.world, self.iteration))
            self.world_history.append(self._world_entry(self.iteration))
        self.resumed_from = (iteration, old_world)
        self.resumed_processes = old_processes
