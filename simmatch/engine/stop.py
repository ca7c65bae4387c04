"""SIGTERM/SIGUSR2/SIGINT -> a flag that every rank acts on at the same step.

Ctrl-C (SIGINT) stops like SIGTERM: finish the step, save, exit 0. A second Ctrl-C aborts
at once without saving (KeyboardInterrupt), for a run that no longer answers.

The handler only sets a flag (no collectives are allowed inside a signal handler). Each
step launches an asynchronous all-reduce (MAX) of the local flag on a gloo group and reads
the previous step's result, so the ranks agree without a host sync on the GPU stream; they
stop one step after the signal arrived.
"""
from __future__ import annotations

import signal
import sys
from types import FrameType

import torch
import torch.distributed as dist

from simmatch import distributed

SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._interrupts = 0
        self._previous: dict[int, object] = {}
        self._group = None
        self._work = None
        self._box = torch.zeros(1)
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

    def agreed(self) -> bool:
        """Call once per step on every rank: True on all ranks at the same step."""
        if self._group is None:
            return self.signum is not None
        agreed_signum = 0
        if self._work is not None:
            self._work.wait()
            agreed_signum = int(self._box.item())
        self._box = torch.tensor([0.0 if self.signum is None else float(self.signum)])
        self._work = dist.all_reduce(self._box, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        if agreed_signum and self.signum is None:
            self.signum = agreed_signum  # another rank was signalled
        return agreed_signum > 0

    def close(self) -> None:
        if self._work is not None:
            self._work.wait()
            self._work = None
