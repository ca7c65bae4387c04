"""Stop a diverged training: non-finite losses counted on the device, read only when the host
syncs anyway (log steps) and before every checkpoint, so no NaN weights are ever saved.

Per step the guard adds three tiny device ops (isfinite, where, maximum) and no host sync.
`check` is a collective: every rank reaches the same verdict at the same step. A loss that
turns NaN at step s therefore stops the run at the first log step or checkpoint after
step s + train.max_nonfinite_steps, at most `train.log_every` steps later, and a
checkpoint due earlier is refused if the weights are already non-finite.
"""
from __future__ import annotations

import torch
import torch.distributed as tdist
import torch.nn as nn

from simmatch import distributed as dist
from simmatch.errors import UserError


class DivergedError(UserError):
    """The loss or the weights are no longer finite: training cannot go on."""


class NonFiniteGuard:
    def __init__(self, limit: int, device: torch.device):
        self.limit = limit
        self._run = torch.zeros((), dtype=torch.int64, device=device)  # current streak
        self._worst = torch.zeros((), dtype=torch.int64, device=device)  # longest since check

    def update(self, loss: torch.Tensor) -> None:
        """Record one step's loss without reading it on the host."""
        bad = ~torch.isfinite(loss.detach())
        self._run = torch.where(bad, self._run + 1, torch.zeros_like(self._run))
        self._worst = torch.maximum(self._worst, self._run)

    @torch.no_grad()
    def weights_finite(self, model: nn.Module) -> bool:
        """Every floating-point tensor of `model` is finite on every rank (a collective)."""
        bad = _non_finite(model, self._worst.device)
        if dist.is_dist() and dist.world_size() > 1:
            tdist.all_reduce(bad, op=tdist.ReduceOp.MAX)
        return not bool(bad.item())

    @torch.no_grad()
    def check(self, iteration: int, where: str, model: nn.Module | None = None) -> None:
        """Raise `DivergedError` on every rank when some rank's loss was non-finite for more
        than `limit` consecutive steps, or when `model` (checked before a save) holds a NaN/inf."""
        bad_weights = torch.zeros((), dtype=torch.int64, device=self._worst.device)
        if model is not None:
            bad_weights = _non_finite(model, self._worst.device)
        packed = torch.stack([self._worst, self._run, bad_weights.to(self._worst.device)])
        if dist.is_dist() and dist.world_size() > 1:
            tdist.all_reduce(packed, op=tdist.ReduceOp.MAX)
        worst, current, weights = (int(v) for v in packed.tolist())
        self._worst = self._run.clone()
        advice = (f"no checkpoint holds non-finite weights (the newest one in {where} is the last step "
                  f"saved with finite weights); lower optim.lr or check the data")
        if worst > self.limit:
            raise DivergedError(f"training diverged: the loss was not finite for {worst} consecutive "
                                f"steps (train.max_nonfinite_steps={self.limit}) up to iteration "
                                f"{iteration}; {advice}")
        if weights:
            raise DivergedError(f"training diverged: the weights are not finite at iteration "
                                f"{iteration} (after {current} non-finite losses in a row); {advice}")


def _non_finite(model: nn.Module, device: torch.device) -> torch.Tensor:
    """1 when a floating-point tensor of `model` holds a NaN or inf, else 0 (int64, on `device`)."""
    floats = [t for t in model.state_dict().values() if t.is_floating_point()]
    if not floats:
        return torch.zeros((), dtype=torch.int64, device=device)
    return torch.stack([(~torch.isfinite(t)).any() for t in floats]).any().long().to(device)
