"""What every rank must agree on each step: a stop signal, and a data error that stops the run now.

Ctrl-C (SIGINT) stops like SIGTERM: finish the step, save, exit 0. A second Ctrl-C aborts
at once without saving (KeyboardInterrupt), for a run that no longer answers.

The handler only sets a flag (no collectives are allowed inside a signal handler). Once per
step, after the step's batches are drawn and before its first collective, every rank joins one
small all-reduce (MAX) on a gloo group of [signal, data error]: a signal anywhere stops every
rank after that step; an image that one rank cannot read stops every rank before the step runs,
with that rank's message, so that no rank waits in a collective for a peer that has left (a
failed draw used to leave its peers in the step's all-reduce for the process group's 30-minute
timeout). The exchange is host-side (gloo, no GPU stream sync); one process needs none.
"""
from __future__ import annotations

import signal
import sys
from types import FrameType

import torch
import torch.distributed as dist

from simmatch import distributed
from simmatch.errors import DataError

SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


class StepDataError(DataError):
    """A data error met while a step drew its batches, known to every rank at the same step: the
    step did not run. `droppable` is the unlabeled image's path when dropping it goes on."""

    def __init__(self, message: str, droppable: str | None = None, rank: int = 0) -> None:
        super().__init__(message)
        self.droppable = droppable
        self.rank = rank


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        self.stopping = False  # every rank agreed to stop after the current step
        self._interrupts = 0
        self._previous: dict[int, object] = {}
        self._group = None
        if distributed.is_dist() and distributed.world_size() > 1:
            self._group = dist.new_group(backend="gloo")

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self._interrupts:
            raise KeyboardInterrupt  # the second Ctrl-C
        if signum == signal.SIGINT:
            self._interrupts += 1
            if distributed.rank() == 0:
                print("Ctrl-C: finishing this step, saving a checkpoint, then stopping "
                      "(Ctrl-C again aborts without saving)", file=sys.stderr, flush=True)
        if self.signum is None:
            self.signum = signum

    def install(self) -> None:
        for s in SIGNALS:
            self._previous[s] = signal.getsignal(s)
            signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def agree(self, error: DataError | None) -> StepDataError | None:
        """Call once per step on every rank, after drawing the step's batches (`error`: this rank's
        draw failed). Sets `stopping` when a signal reached any rank; returns the data error that
        stops every rank now (the lowest failing rank's), or None."""
        if self._group is None:
            self.stopping = self.signum is not None
            return None if error is None else _agreed(error, distributed.rank())
        box = torch.tensor([float(self.signum or 0), 0.0 if error is None else 1.0])
        dist.all_reduce(box, op=dist.ReduceOp.MAX, group=self._group)
        agreed_signum, failed = int(box[0].item()), box[1].item() > 0
        if agreed_signum and self.signum is None:
            self.signum = agreed_signum  # another rank was signalled
        self.stopping = agreed_signum > 0
        if not failed:
            return None
        mine = None if error is None else (str(error), getattr(error, "droppable", None))
        shared: list = [None] * distributed.world_size()
        dist.all_gather_object(shared, mine, group=self._group)
        rank = next(r for r, item in enumerate(shared) if item is not None)
        message, droppable = shared[rank]
        return StepDataError(message, droppable, rank)


def _agreed(error: DataError, rank: int) -> StepDataError:
    return StepDataError(str(error), getattr(error, "droppable", None), rank)
