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
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from dali_pipelines import GRAPH_VERSION
from simmatch.data.base import (
    LABELED_KIND,
    TrainStream,
    as_nchw,
    decode_error,
    pack_batch,
    val_resize_size,
    with_drop_hint,
)
from simmatch.data.sharding import ShardPlan, derive_seed, val_slice
from simmatch.errors import ConfigError, DataError, ImageError, descriptor_limit
from simmatch.images.source import ImageSource

MIN_SEGMENT_BATCHES = 64


def import_dali() -> None:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as exc:
        limit = descriptor_limit(exc)  # installed, but its libraries could not be opened
        if limit is not None:
            raise limit from None
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


class EncodedBatches:
    """The external source of a shard set's pipelines: batch k (DALI's BatchInfo.iteration) is the
    bytes of files[k*b:(k+1)*b] and their labels, read in `threads` threads (positional reads
    release the GIL); past the end it starts again, as the file reader does, and a short last
    batch is padded with its last image (the file reader's pad_last_batch). A read error is kept
    to be raised as it is (DALI's wrapping would hide the image it names)."""

    def __init__(self, source: ImageSource, files: list[str], labels: list[int], batch: int,
                 threads: int) -> None:
        self.source, self.files, self.labels, self.batch = source, files, labels, batch
        self.batches = max(1, math.ceil(len(files) / batch))
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads))
        self.error: DataError | None = None

    def batch_of(self, info) -> tuple[list[str], list[int]]:
        """The images and labels of DALI's batch `info.iteration`, cyclically, the last one padded."""
        start = (info.iteration % self.batches) * self.batch
        rels = self.files[start:start + self.batch]
        labels = self.labels[start:start + self.batch]
        return rels + rels[-1:] * (self.batch - len(rels)), labels + labels[-1:] * (self.batch - len(labels))

    def __call__(self, info) -> tuple[list[np.ndarray], list[np.ndarray]]:
        rels, labels = self.batch_of(info)
        try:
            data = list(self.pool.map(self._read, rels))
        except DataError as exc:
            self.error = exc
            raise
        return ([np.frombuffer(d, dtype=np.uint8) for d in data],
                [np.array([label], dtype=np.int32) for label in labels])

    def _read(self, rel: str) -> bytes:
        try:
            return self.source.read(rel)
        except ImageError:
            raise
        except DataError as exc:  # a damaged shard: the error names the image; it carries its path too
            raise ImageError(str(exc), rel) from None

    def close(self) -> None:
        self.pool.shutdown(wait=False)


class PixelBatches(EncodedBatches):
    """The external source of images held as pixels (an archive's, simmatch/images/arrays.py):
    batch k is their uint8 HWC arrays, as EncodedBatches orders and pads them."""

    def __call__(self, info) -> tuple[list[np.ndarray], list[np.ndarray]]:
        rels, labels = self.batch_of(info)
        return ([self.source.pixels(rel) for rel in rels],
                [np.array([label], dtype=np.int32) for label in labels])


def reader_of(source: ImageSource) -> str:
    """The DALI reader of a source: its file reader for a folder, an external source otherwise;
    a DALI checkpoint holds that reader's state, so it restores only into the same kind."""
    return "file" if source.kind == "folder" else "external"


def feeder(source: ImageSource, files: list[str], labels: list[int], batch: int,
           threads: int) -> EncodedBatches | None:
    if source.kind == "arrays":
        return PixelBatches(source, files, labels, batch, 1)  # copies from memory: no threads needed
    return None if source.kind == "folder" else EncodedBatches(source, files, labels, batch, threads)


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
                 source: ImageSource, files: list[str], label_table: torch.Tensor,
                 device: torch.device, dali_device: str, channels_last: bool) -> None:
        super().__init__(kind, plan)
        self._definition = definition
        self._cfg = data_cfg
        self._source = source
        self._feeder: EncodedBatches | None = None
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
        self._feeder = feeder(self._source, self._segment_files, order, self.plan.batch_size,
                              self._cfg.num_threads)
        self._pipe = build(self._definition, device=self._dali_device, device_id=device_id,
                           batch_size=self.plan.batch_size, num_threads=self._cfg.num_threads,
                           seed=seed, prefetch=self._cfg.prefetch, checkpoint=checkpoint,
                           cfg=self._cfg, file_root=str(self._source.root), files=self._segment_files,
                           indices=order, layout=layout_of(self._channels_last), source=self._feeder)
        self._pending = None
        for k in range(skip):
            self._run(k)

    def _close_feeder(self) -> None:
        if self._feeder is not None:
            self._feeder.close()
            self._feeder = None

    def _run(self, k: int):
        try:
            return self._pipe.run()
        except RuntimeError as exc:
            b = self.plan.batch_size
            window = self._segment_files[k * b:(k + self._cfg.prefetch + 2) * b]
            known = self._feeder.error if self._feeder is not None else None
            self.close()
            error = known if known is not None else \
                decode_error(dali_reason(exc), self._source, window, f"DALI {self.kind} pipeline")
            raise with_drop_hint(error, self.kind) from None

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

    def _coordinates(self) -> tuple[int, int]:
        epoch, batch = self._segment_epoch, self._batch
        while batch >= self.plan.batches_in(epoch):
            batch -= self.plan.batches_in(epoch)
            epoch += 1
        return epoch, batch

    def _replay_extra(self) -> dict:
        return {"dali": None, "reader": reader_of(self._source), "graph": GRAPH_VERSION}

    def _position(self) -> tuple[int, int, dict]:
        epoch, batch = self._coordinates()
        checkpoint = None
        if self._batch > 0:
            checkpoint = self._pipe.checkpoint() if self._pipe is not None else self._pending
        return epoch, batch, {"dali": checkpoint, "reader": reader_of(self._source), "graph": GRAPH_VERSION}

    def _seek(self, epoch: int, batch: int, extra: dict) -> None:
        """Go to (epoch, batch); the saved DALI checkpoint restores the pipeline there, unless it was
        written by another reader (the run moved between a folder and shards: data.format) or by
        another layout of the graphs' operators (dali_pipelines.GRAPH_VERSION: a run saved by an
        earlier version), when the segment's first batches are run again instead (the same images
        and seeds)."""
        self.close()
        self._segment_epoch = self._segment_start(epoch)
        self._batch = sum(self.plan.batches_in(e) for e in range(self._segment_epoch, epoch)) + batch
        checkpoint = extra.get("dali")
        if extra.get("reader", "file") != reader_of(self._source) or extra.get("graph", 1) != GRAPH_VERSION:
            checkpoint = None
        self._pending = bytes(checkpoint) if checkpoint is not None and self._batch > 0 else None

    def close(self) -> None:
        self._pipe = None
        self._close_feeder()


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

    def __init__(self, data_cfg: Any, source: ImageSource, files: list[str], labels: list[int],
                 batch_size: int, rank: int, world_size: int, device: torch.device,
                 dali_device: str, channels_last: bool) -> None:
        start, stop = val_slice(len(files), rank, world_size)
        self._files, self._labels = files[start:stop], labels[start:stop]
        self._cfg, self._source, self._batch = data_cfg, source, batch_size
        self._feeder: EncodedBatches | None = None
        self._rank, self._device, self._dali_device = rank, device, dali_device
        self._channels_last = channels_last
        self._pipe = None
        self._at_start = True  # the reader's next batch is the first of the list
        self.builds = 0

    def _build(self) -> None:
        from dali_pipelines.common import build, layout_of

        val_pipeline = dali_definitions(self._source)["val"]
        self.close()  # release the old pipeline's buffers before allocating new ones
        self._feeder = feeder(self._source, self._files, self._labels, self._batch, self._cfg.num_threads)
        self._pipe = build(val_pipeline, device=self._dali_device,
                           device_id=dali_device_id(self._device, self._dali_device),
                           batch_size=self._batch, num_threads=self._cfg.num_threads,
                           seed=derive_seed(self._rank, 3), prefetch=self._cfg.prefetch,
                           cfg=self._cfg, file_root=str(self._source.root), files=self._files,
                           labels=self._labels, resize_shorter=val_resize_size(self._cfg),
                           layout=layout_of(self._channels_last), source=self._feeder)
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
                known = self._feeder.error if self._feeder is not None else None
                self.close()
                if known is not None:
                    raise known from None
                window = mine[k * b:(k + self._cfg.prefetch + 2) * b]
                raise decode_error(dali_reason(exc), self._source, window, "DALI val pipeline") from None
            n = min(b, len(mine) - k * b)
            x = as_nchw(to_torch(x, self._device), self._channels_last)[:n]
            yield {"x": x, "y": to_torch(y, self._device).reshape(-1).long()[:n]}
        self._at_start = True

    def close(self) -> None:
        self._pipe = None
        if self._feeder is not None:
            self._feeder.close()
            self._feeder = None


def dali_definitions(source: ImageSource) -> dict[str, Callable]:
    """The pipeline definitions for images of `source` (encoded, or pixels: dali_pipelines/arrays.py),
    imported only when the DALI backend is used."""
    import_dali()
    if source.kind == "arrays":
        from dali_pipelines.arrays import array_labeled_pipeline, array_unlabeled_pipeline, array_val_pipeline

        return {LABELED_KIND: array_labeled_pipeline, "unlabeled": array_unlabeled_pipeline, "val": array_val_pipeline}
    from dali_pipelines.labeled import labeled_pipeline
    from dali_pipelines.unlabeled import unlabeled_pipeline
    from dali_pipelines.val import val_pipeline

    return {LABELED_KIND: labeled_pipeline, "unlabeled": unlabeled_pipeline, "val": val_pipeline}
