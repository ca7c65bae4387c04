"""Optional per-phase timing of a training step, for benchmarks/step.py.

Disabled (the default) it is a no-op; enabled it synchronises the device around each phase,
which is exactly the host sync the training loop otherwise avoids.
"""
from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class PhaseTimer:
    def __init__(self, enabled: bool = False, device: torch.device | None = None):
        self.enabled = enabled
        self.device = device
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._sync()
        t0 = time.perf_counter()
        yield
        self._sync()
        self.totals[name] += time.perf_counter() - t0
        self.counts[name] += 1

    def means_ms(self) -> dict[str, float]:
        return {k: 1e3 * v / self.counts[k] for k, v in self.totals.items()}


NO_TIMER = PhaseTimer(enabled=False)
