"""What every method shares: a student, its EMA teacher, and the engine-facing interface."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from simmatch import distributed as dist
from simmatch.methods.card import MethodCard
from simmatch.models import EMA, Network
from simmatch.models.bn_stats import RankBNStats
from simmatch.timing import NO_TIMER, PhaseTimer

Batch = dict[str, torch.Tensor]
Targets = dict[str, torch.Tensor | None]  # per-image target rows of one rank's batch


@dataclass
class StepTargets:
    """What a step's no-grad part made (`Method.targets`): each rank's target rows, in rank order,
    and what the step writes into the method's memory (banks, queues) once its optimizer step is
    done (`Method.after_step`), so that this step's targets use the memory as it was before it."""

    ranks: list[Targets]
    memory: Any = None


class Method(nn.Module):
    """Owns the model-side state (student, teacher, banks, queues) as submodules and buffers,
    so `state_dict()` is everything a checkpoint needs from it. The engine owns the rest.

    Subclasses are registered by name (`simmatch.methods.card.register`), which attaches their
    card (streams, teacher, evaluation, config section), and built from their section of the
    config by their `from_config`.
    """

    card: MethodCard
    timer: PhaseTimer = NO_TIMER  # benchmarks swap in an enabled one

    @property
    def needs_labeled(self) -> bool:
        return self.card.needs_labeled

    @property
    def needs_unlabeled(self) -> bool:
        return self.card.needs_unlabeled

    @property
    def trains_classifier(self) -> bool:
        """False: evaluated by k-NN on the trunk's features."""
        return self.card.trains_classifier

    def __init__(self, student: Network, ema_momentum: float, teacher: str = "eman", seed: int = 0):
        super().__init__()
        self.student = student
        self.teacher = EMA(student, ema_momentum, teacher)
        self.seed = seed

    # True: the step's targets come from the student's own forward (student_losses), whose dict
    # then also holds `memory`, what after_step writes; the engine runs one rank per process then.
    targets_in_forward: bool = False

    # Ranks whose images one forward normalises together (methods.build_method sets it): 1, or
    # the ranks of a BN group that this process runs itself under virtual ranks (train.bn_group_ranks).
    ranks_per_forward: int = 1

    @classmethod
    def from_config(cls, cfg: Any, params: Any, derived: Any, bank_labels: torch.Tensor) -> Method:
        """The method as `cfg` describes it (`params`: its own section, `cfg.method.params`; its
        scaled quantities in `derived.method_values`), with a freshly initialised student."""
        raise NotImplementedError

    def augment_views(self, labeled: list[Batch | None], unlabeled: list[Batch | None], ranks: list[int],
                      iteration: int) -> tuple[list[Batch | None], list[Batch | None]]:
        """The drawn batches of this process's ranks (global ids `ranks`), changed by a method whose
        views depend on its own state (ReMixMatch's learned CTAugment policy) or that adds the step's
        per-rank random draws to them; before `targets`. Default: as drawn."""
        return labeled, unlabeled

    def targets(self, labeled: list[Batch | None], unlabeled: list[Batch | None], iteration: int) -> StepTargets:
        """The step's no-grad part (teacher, alignment, propagation) for every rank this process
        runs (one, or its virtual ranks, in rank order): one dict of per-image target rows each,
        and what `after_step` writes.

        Done for all of them before any student forward, because what they share (the
        shuffle-BN permutation, the global means of distribution alignment, the bank as it was)
        is a function of all the step's ranks, as on that many GPUs."""
        return StepTargets([{} for _ in labeled])

    def student_losses(self, student: nn.Module, labeled: Batch | None, unlabeled: Batch | None,
                       targets: Targets, iteration: int) -> dict[str, torch.Tensor]:
        """`loss` (differentiable) plus detached scalar diagnostics of one rank's batch (or of a
        BN group's ranks merged, see `merge`), given its `targets`. `student` may be DDP-wrapped.
        A method whose targets come from this forward (`targets_in_forward`) adds `memory`: what
        `after_step` writes (the engine hands it over as the step's `StepTargets.memory`)."""
        raise NotImplementedError

    @torch.no_grad()
    def teacher_forward(self, parts: list[torch.Tensor], iteration: int,
                        **kwargs) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(logits, embedding) of the teacher for each rank's input in `parts` (this process's
        ranks, in rank order; equal sizes).

        With an "ema_shuffle_bn" teacher and several ranks the global batch is permuted across
        all ranks first (one permutation per step from (seed, iteration), the same everywhere),
        so no rank's BN normalises its own samples together, and the outputs are sent back to
        the rows their inputs came from: MoCo's shuffle-BN, one all_to_all each way between
        processes. Each rank's share of the shuffled batch is forwarded on its own (its BN
        batch), `ranks_per_forward` ranks at a time.
        """
        n = parts[0].shape[0]
        x = torch.cat(parts) if len(parts) > 1 else parts[0]
        cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        processes = dist.world_size()
        shuffle = self.teacher.shuffle_bn and processes * len(parts) > 1
        if shuffle:
            perm = dist.shuffle_permutation(x.shape[0] * processes, self.seed, iteration)
            plan = dist.shuffle_plan(perm, dist.rank(), processes, x.device) if processes > 1 else None
            x = dist.batch_shuffle(x, plan) if plan is not None else x[perm.to(x.device)]
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)  # keep the layout
        chunks = x.split(n * self.ranks_per_forward)
        stats = RankBNStats(self.teacher.module, len(chunks) if self.teacher.module.training else 1)
        outs = []
        for chunk in chunks:
            outs.append(self.teacher(chunk, **kwargs))
            stats.after_forward()
        logits = torch.cat([o[0] for o in outs]) if len(outs) > 1 else outs[0][0]
        emb = None if outs[0][1] is None else torch.cat([o[1] for o in outs]) if len(outs) > 1 else outs[0][1]
        if shuffle:
            c = logits.shape[1]
            joined = torch.cat([logits.float()] + ([emb.float()] if emb is not None else []), dim=1)
            if plan is not None:
                joined = dist.batch_unshuffle(joined, plan)  # one exchange for both
            else:
                back = torch.empty_like(joined)
                back[perm.to(x.device)] = joined
                joined = back
            logits, emb = joined[:, :c], (joined[:, c:] if emb is not None else None)
        return [(lg, None if emb is None else e) for lg, e in
                zip(logits.split(n), emb.split(n) if emb is not None else [None] * len(parts))]

    @torch.no_grad()
    def after_step(self, step: StepTargets) -> None:
        """Called after every optimizer step with what `targets` made for it."""
        with self.timer("ema"):
            self.teacher.update(self.student)
            if self.teacher.shuffle_bn:
                # a train-mode teacher keeps its own BN running statistics (used only when it
                # is evaluated); averaged over ranks so every rank holds the same teacher
                dist.average_buffers(self.teacher.module)


def merge(parts: list) -> object:
    """Several ranks' batches (or targets) as one: each tensor concatenated along its rows, lists
    (the strong views) element by element, None kept. The batch of a forward that normalises a
    BN group's ranks together; row order does not matter to BN or to the losses' means."""
    first = parts[0]
    if len(parts) == 1 or first is None:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, (list, tuple)):
        return [merge([p[i] for p in parts]) for i in range(len(first))]
    return {k: merge([p[k] for p in parts]) for k in first}
