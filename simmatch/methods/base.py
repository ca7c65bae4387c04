"""What every method shares: a student, its EMA teacher, and the engine-facing interface."""
from __future__ import annotations

import torch
import torch.nn as nn

from simmatch import distributed as dist
from simmatch.methods.spec import MethodSpec
from simmatch.models import EMA, Network
from simmatch.timing import NO_TIMER, PhaseTimer

Batch = dict[str, torch.Tensor]


class Method(nn.Module):
    """Owns the model-side state (student, teacher, banks, queues) as submodules and buffers,
    so `state_dict()` is everything a checkpoint needs from it. The engine owns the rest.

    Subclasses are registered by name (`simmatch.methods.registry.register`), which attaches
    their facts (`spec`: streams, teacher, evaluation; simmatch/methods/spec.py), and built from
    the config by their `from_config`.
    """

    spec: MethodSpec
    timer: PhaseTimer = NO_TIMER  # benchmarks swap in an enabled one

    @property
    def needs_labeled(self) -> bool:
        return self.spec.needs_labeled

    @property
    def needs_unlabeled(self) -> bool:
        return self.spec.needs_unlabeled

    @property
    def trains_classifier(self) -> bool:
        """False: evaluated by k-NN on the trunk's features."""
        return self.spec.trains_classifier

    def __init__(self, student: Network, ema_momentum: float, teacher: str = "eman", seed: int = 0):
        super().__init__()
        self.student = student
        self.teacher = EMA(student, ema_momentum, teacher)
        self.seed = seed

    @classmethod
    def from_config(cls, cfg, derived, bank_labels: torch.Tensor) -> Method:
        """The method as `cfg` describes it, with a freshly initialised student."""
        raise NotImplementedError

    def training_losses(self, student: nn.Module, labeled: Batch | None, unlabeled: Batch | None,
                        iteration: int) -> dict[str, torch.Tensor]:
        """`loss` (differentiable) plus detached scalar diagnostics. `student` may be DDP-wrapped."""
        raise NotImplementedError

    @torch.no_grad()
    def teacher_forward(self, x: torch.Tensor, iteration: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, embedding) of the teacher for this rank's `x`.

        With an "ema_shuffle_bn" teacher on several ranks the global batch is permuted across
        ranks first (one permutation per step from (seed, iteration), the same on every rank),
        so no rank's BN normalises its own samples together, and the outputs are sent back to
        the ranks and rows their inputs came from: MoCo's shuffle-BN, one all_to_all each way.
        """
        world = dist.world_size()
        if not self.teacher.shuffle_bn or world == 1:
            return self.teacher(x, **kwargs)
        perm = dist.shuffle_permutation(x.shape[0] * world, self.seed, iteration)
        plan = dist.shuffle_plan(perm, dist.rank(), world, x.device)
        shuffled = dist.batch_shuffle(x, plan)
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            shuffled = shuffled.contiguous(memory_format=torch.channels_last)  # keep the layout
        logits, emb = self.teacher(shuffled, **kwargs)
        c = logits.shape[1]
        parts = [logits.float()] + ([emb.float()] if emb is not None else [])
        out = dist.batch_unshuffle(torch.cat(parts, dim=1), plan)  # one exchange for both
        return out[:, :c], (out[:, c:] if emb is not None else None)

    @torch.no_grad()
    def after_step(self) -> None:
        """Called after every optimizer step."""
        with self.timer("ema"):
            self.teacher.update(self.student)
            if self.teacher.shuffle_bn:
                # a train-mode teacher keeps its own BN running statistics (used only when it
                # is evaluated); averaged over ranks so every rank holds the same teacher
                dist.average_buffers(self.teacher.module)
