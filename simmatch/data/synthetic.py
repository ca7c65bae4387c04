"""Synthetic streams: fixed random images made once on the device, no I/O, for timing compute.

Images are drawn once per view (so drawing costs nothing); the index and labels move with
the position like a real epoch-sharded stream, so the method's bank logic is exercised.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from simmatch.data.base import TrainStream, pack_batch
from simmatch.data.sharding import ShardPlan, derive_seed, val_slice


def synthetic_labels(n: int, num_classes: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64) % num_classes


def _images(n: int, crop: int, seed: int, device: torch.device, channels_last: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, crop, crop, generator=gen).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class SyntheticTrainStream(TrainStream):
    def __init__(self, kind: str, data_cfg: Any, plan: ShardPlan, label_table: torch.Tensor,
                 device: torch.device, channels_last: bool) -> None:
        super().__init__(kind, plan)
        sizes = [data_cfg.crop_size]  # weak (or labeled) view, then each strong view's size
        if kind != "labeled":
            sizes += [size for size, _, _ in data_cfg.strong_crops()]
        self._views = [_images(plan.batch_size, size,
                               derive_seed(plan.seed, plan.tag, plan.rank, v), device, channels_last)
                       for v, size in enumerate(sizes)]
        self._labels = label_table.to(device)
        self._device = device
        self._epoch, self._batch = 0, 0
        self._order: torch.Tensor | None = None

    def __next__(self) -> dict[str, Any]:
        if self._order is None:
            self._order = torch.from_numpy(self.plan.rank_order(self._epoch)).to(self._device)
        b = self.plan.batch_size
        index = self._order[self._batch * b:(self._batch + 1) * b]
        self._batch += 1
        if self._batch == self.plan.batches_in(self._epoch):
            self._epoch, self._batch, self._order = self._epoch + 1, 0, None
        return pack_batch(self.kind, self._views, index, self._labels)

    def _position(self) -> tuple[int, int, dict]:
        return self._epoch, self._batch, {}

    def _seek(self, epoch: int, batch: int, extra: dict) -> None:
        self._epoch, self._batch, self._order = epoch, batch, None


def synthetic_val_batches(data_cfg: Any, n: int, batch_size: int, rank: int, world_size: int,
                          device: torch.device, channels_last: bool) -> Iterator[dict]:
    start, stop = val_slice(n, rank, world_size)
    labels = synthetic_labels(n, data_cfg.num_classes).to(device)
    for lo in range(start, stop, batch_size):
        hi = min(stop, lo + batch_size)
        x = _images(hi - lo, data_cfg.crop_size, derive_seed(lo, 4), device, channels_last)
        yield {"x": x, "y": labels[lo:hi]}
