"""DALI streams: per-segment pipelines over our own file order, exact resume by DALI checkpoints.

A segment is a fixed group of consecutive epochs (enough for `MIN_SEGMENT_BATCHES`, so tiny
labeled sets do not rebuild a pipeline every few steps; one epoch at ImageNet scale), counted
from epoch 0 or from the first epoch of an elastic resume (sharding.ShardPlan.tail_epoch). Its
pipeline reads the rank's files of those epochs in order (sharding.ShardPlan) with a seed
derived from (seed, stream, segment, GLOBAL rank). The position is (epoch, batch) plus the
pipeline's DALI checkpoint (reader position and every RNG state), so a resumed stream
continues bit-identically without decoding the skipped batches.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simmatch.data.base import (
    LABELED_KIND,
    TrainStream,
    as_nchw,
    pack_batch,
    val_resize_size,
    with_drop_hint,
)
from simmatch.data.images import image_problem
from simmatch.data.sharding import ShardPlan, derive_seed, val_slice
from simmatch.errors import ConfigError, DataError

MIN_SEGMENT_BATCHES = 64


def import_dali() -> None:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as exc:
        raise ConfigError("data.backend=dali needs NVIDIA DALI: pip install '.[dali]' "
                          "(or '.[dali-cuda120]' on CUDA 12 drivers), or set data.backend=torch"
                          ) from exc


def to_torch(output: Any, device: torch.device) -> torch.Tensor:
    """One DALI output (a dense TensorList) as a torch tensor on `device`.

    CPU outputs become a zero-copy view: the numpy array's base holds DALI's buffer, which
    the (dynamic) executor frees only when the last reference goes, so the view stays valid;
    GPU outputs are copied on torch's current stream, ordered after DALI's work.
    """
    tensor = output.as_tensor()
    if not type(tensor).__name__.endswith("GPU"):
        return torch.from_numpy(np.asarray(tensor)).to(device, non_blocking=True)
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    target = device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=target)
    feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(target))
    return out.to(device)


def decode_error(exc: Exception, file_root: Path, candidates: list[str], what: str) -> DataError:
    """Name the unreadable file among `candidates` (DALI's message does not name it)."""
    for rel in dict.fromkeys(candidates):
        reason = image_problem(file_root / rel)
        if reason is not None:
            return DataError(f"cannot decode image {file_root / rel}: {reason}")
    return DataError(f"{what} failed (every image of the batch decodes): {dali_reason(exc)}")


def dali_reason(exc: Exception) -> str:
    """DALI's own explanation in one line: its operator and assertion lines, no stack frames."""
    skip = ("critical error in pipeline", "current pipeline object", "stacktrace")
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    kept = [ln for ln in lines if not ln.lower().startswith(skip) and not ln[0].isdigit()
            and not ln.startswith("[")]
    return " ".join(kept[:4])[:600] or type(exc).__name__


class DaliTrainStream(TrainStream):
    """Endless labeled or unlabeled stream over a DALI pipeline definition."""

    def __init__(self, kind: str, definition: Callable, data_cfg: Any, plan: ShardPlan,
                 file_root: Path, files: list[str], label_table: torch.Tensor,
                 device: torch.device, dali_device: str, channels_last: bool) -> None:
        super().__init__(kind, plan)
        self._definition = definition
        self._cfg = data_cfg
        self._root = Path(file_root)
        self._files = files
        self._labels = label_table.to(device)
        self._device = device
        self._dali_device = dali_device
        self._channels_last = channels_last
        self._epochs_per_segment = max(1, math.ceil(MIN_SEGMENT_BATCHES / plan.batches_per_epoch))
        self._segment_epoch = 0
        self._batch = 0  # batches drawn from the current segment
        self._pending: bytes | None = None  # checkpoint to open the next pipeline from
        self._pipe = None
        self._segment_files: list[str] = []

    @property
    def _segment_epochs(self) -> range:
        return range(self._segment_epoch, self._segment_epoch + self._epochs_per_segment)

    @property
    def _segment_batches(self) -> int:
        return sum(self.plan.batches_in(e) for e in self._segment_epochs)

    def _segment_start(self, epoch: int) -> int:
        """First epoch of `epoch`'s segment; segments start at an elastic resume's first epoch."""
        anchor = max(0, self.plan.tail_epoch)
        return anchor + (epoch - anchor) // self._epochs_per_segment * self._epochs_per_segment

    def _open(self) -> None:
        from dali_pipelines.common import build, layout_of

        order = [int(i) for e in self._segment_epochs for i in self.plan.rank_order(e)]
        self._segment_files = [self._files[i] for i in order]
        device_id = dali_device_id(self._device, self._dali_device)
        p = self.plan
        parts = [p.seed, p.tag, self._segment_epoch, p.rank]
        if p.tail_epoch >= 0:  # after an elastic resume: seeds of the new layout
            parts += [p.world_size, p.tail_epoch, p.tail_offset]
        seed = derive_seed(*parts)
        skip = 0
        checkpoint = self._pending
        if checkpoint is None and self._batch > 0:
            skip = self._batch  # no checkpoint saved: replay the segment up to the position
        self._pipe = build(self._definition, device=self._dali_device, device_id=device_id,
                           batch_size=self.plan.batch_size, num_threads=self._cfg.num_threads,
                           seed=seed, prefetch=self._cfg.prefetch, checkpoint=checkpoint,
                           cfg=self._cfg, file_root=str(self._root), files=self._segment_files,
                           indices=order, layout=layout_of(self._channels_last))
        self._pending = None
        for k in range(skip):
            self._run(k)

    def _run(self, k: int):
        try:
            return self._pipe.run()
        except RuntimeError as exc:
            b = self.plan.batch_size
            window = self._segment_files[k * b:(k + self._cfg.prefetch + 2) * b]
            self.close()
            raise with_drop_hint(decode_error(exc, self._root, window, f"DALI {self.kind} pipeline"),
                                 self.kind, self._root) from None

    def __next__(self) -> dict[str, Any]:
        if self._pipe is None:
            self._open()
        outputs = self._run(self._batch)
        views = [as_nchw(to_torch(o, self._device), self._channels_last) for o in outputs[:-1]]
        index = to_torch(outputs[-1], self._device)
        self._batch += 1
        if self._batch * self.plan.batch_size == len(self._segment_files):  # the segment's last batch
            self.close()
            self._segment_epoch += self._epochs_per_segment
            self._batch = 0
        return pack_batch(self.kind, views, index, self._labels)

    def _position(self) -> tuple[int, int, dict]:
        epoch, batch = self._segment_epoch, self._batch
        while batch >= self.plan.batches_in(epoch):
            batch -= self.plan.batches_in(epoch)
            epoch += 1
        checkpoint = None
        if self._batch > 0:
            checkpoint = self._pipe.checkpoint() if self._pipe is not None else self._pending
        return epoch, batch, {"dali": checkpoint}

    def _seek(self, epoch: int, batch: int, extra: dict) -> None:
        self.close()
        self._segment_epoch = self._segment_start(epoch)
        self._batch = sum(self.plan.batches_in(e) for e in range(self._segment_epoch, epoch)) + batch
        checkpoint = extra.get("dali")
        self._pending = bytes(checkpoint) if checkpoint is not None and self._batch > 0 else None

    def close(self) -> None:
        self._pipe = None


def dali_device_id(device: torch.device, dali_device: str) -> int | None:
    """DALI's device_id: the torch device's index, None for CPU operators."""
    if dali_device != "gpu":
        return None
    if device.type == "cuda" and device.index is not None:
        return device.index
    from simmatch.distributed import local_device_index

    return local_device_index()


class DaliValPasses:
    """Passes over this rank's contiguous slice of a validation list, each image once, the last
    batch partial; one pipeline for the whole run, built at the first pass.

    A pipeline with a GPU decoder pins nvJPEG buffers when it is built: one per evaluation
    would allocate (and, until garbage-collected, hold) them again each time. The reader pads
    the last batch (`pad_last_batch`), so a pass is exactly ceil(n / batch) runs and the next
    pass starts at the first file again, the batches prefetched past a pass being its first
    ones. A pass left unfinished leaves the reader mid-list: the next pass rebuilds.
    """

    def __init__(self, data_cfg: Any, file_root: Path, files: list[str], labels: list[int],
                 batch_size: int, rank: int, world_size: int, device: torch.device,
                 dali_device: str, channels_last: bool) -> None:
        start, stop = val_slice(len(files), rank, world_size)
        self._files, self._labels = files[start:stop], labels[start:stop]
        self._cfg, self._root, self._batch = data_cfg, Path(file_root), batch_size
        self._rank, self._device, self._dali_device = rank, device, dali_device
        self._channels_last = channels_last
        self._pipe = None
        self._at_start = True  # the reader's next batch is the first of the list
        self.builds = 0

    def _build(self) -> None:
        from dali_pipelines.common import build, layout_of
        from dali_pipelines.val import val_pipeline

        self._pipe = None  # release the old pipeline's buffers before allocating new ones
        self._pipe = build(val_pipeline, device=self._dali_device,
                           device_id=dali_device_id(self._device, self._dali_device),
                           batch_size=self._batch, num_threads=self._cfg.num_threads,
                           seed=derive_seed(self._rank, 3), prefetch=self._cfg.prefetch,
                           cfg=self._cfg, file_root=str(self._root), files=self._files,
                           labels=self._labels, resize_shorter=val_resize_size(self._cfg),
                           layout=layout_of(self._channels_last))
        self.builds += 1
        self._at_start = True

    def __call__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self._pass()

    def _pass(self) -> Iterator[dict[str, torch.Tensor]]:
        mine, b = self._files, self._batch
        if not mine:
            return
        if self._pipe is None or not self._at_start:
            self._build()
        self._at_start = False
        for k in range(math.ceil(len(mine) / b)):
            try:
                x, y = self._pipe.run()
            except RuntimeError as exc:
                self.close()
                window = mine[k * b:(k + self._cfg.prefetch + 2) * b]
                raise decode_error(exc, self._root, window, "DALI val pipeline") from None
            n = min(b, len(mine) - k * b)
            x = as_nchw(to_torch(x, self._device), self._channels_last)[:n]
            yield {"x": x, "y": to_torch(y, self._device).reshape(-1).long()[:n]}
        self._at_start = True

    def close(self) -> None:
        self._pipe = None


def dali_definitions() -> dict[str, Callable]:
    """The pipeline definitions, imported only when the DALI backend is used."""
    import_dali()
    from dali_pipelines.labeled import labeled_pipeline
    from dali_pipelines.unlabeled import unlabeled_pipeline

    return {LABELED_KIND: labeled_pipeline, "unlabeled": unlabeled_pipeline}
