"""DALI streams: per-segment pipelines over our own file order, exact resume by DALI checkpoints.

A segment is a fixed group of consecutive epochs (enough for `MIN_SEGMENT_BATCHES`, so tiny
labeled sets do not rebuild a pipeline every few steps; one epoch at ImageNet scale). Its
pipeline reads the rank's files of those epochs in order (sharding.ShardPlan) with a seed
derived from (seed, stream, segment, GLOBAL rank). The position is (epoch, batch) plus the
pipeline's DALI checkpoint (reader position and every RNG state), so a resumed stream
continues bit-identically without decoding the skipped batches.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from simmatch.data.base import LABELED_KIND, TrainStream, as_nchw, pack_batch
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
    def _segment_batches(self) -> int:
        return self._epochs_per_segment * self.plan.batches_per_epoch

    def _open(self) -> None:
        from dali_pipelines.common import build, layout_of

        epochs = range(self._segment_epoch, self._segment_epoch + self._epochs_per_segment)
        order = [int(i) for e in epochs for i in self.plan.rank_order(e)]
        self._segment_files = [self._files[i] for i in order]
        device_id = self._device.index if self._device.type == "cuda" else None
        if self._dali_device == "gpu" and device_id is None:
            device_id = torch.cuda.current_device()
        seed = derive_seed(self.plan.seed, self.plan.tag, self._segment_epoch, self.plan.rank)
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
            raise decode_error(exc, self._root, window, f"DALI {self.kind} pipeline") from None

    def __next__(self) -> dict[str, Any]:
        if self._pipe is None:
            self._open()
        outputs = self._run(self._batch)
        views = [as_nchw(to_torch(o, self._device), self._channels_last) for o in outputs[:-1]]
        index = to_torch(outputs[-1], self._device)
        self._batch += 1
        if self._batch == self._segment_batches:
            self.close()
            self._segment_epoch += self._epochs_per_segment
            self._batch = 0
        return pack_batch(self.kind, views, index, self._labels)

    def _position(self) -> tuple[int, int, dict]:
        bpe = self.plan.batches_per_epoch
        epoch = self._segment_epoch + self._batch // bpe
        checkpoint = None
        if self._batch > 0:
            checkpoint = self._pipe.checkpoint() if self._pipe is not None else self._pending
        return epoch, self._batch % bpe, {"dali": checkpoint}

    def _seek(self, epoch: int, batch: int, extra: dict) -> None:
        self.close()
        eps = self._epochs_per_segment
        self._segment_epoch = epoch - epoch % eps
        self._batch = (epoch - self._segment_epoch) * self.plan.batches_per_epoch + batch
        checkpoint = extra.get("dali")
        self._pending = bytes(checkpoint) if checkpoint is not None and self._batch > 0 else None

    def close(self) -> None:
        self._pipe = None


def dali_val_batches(data_cfg: Any, file_root: Path, files: list[str], labels: list[int],
                     batch_size: int, rank: int, world_size: int, device: torch.device,
                     dali_device: str, channels_last: bool) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's contiguous slice of the validation set, each image once; last batch partial."""
    from dali_pipelines.common import build, layout_of
    from dali_pipelines.val import val_pipeline

    start, stop = val_slice(len(files), rank, world_size)
    mine, ys = files[start:stop], labels[start:stop]
    if not mine:
        return
    device_id = device.index if device.type == "cuda" else None
    if dali_device == "gpu" and device_id is None:
        device_id = torch.cuda.current_device()
    pipe = build(val_pipeline, device=dali_device, device_id=device_id, batch_size=batch_size,
                 num_threads=data_cfg.num_threads, seed=derive_seed(rank, 3),
                 prefetch=data_cfg.prefetch, cfg=data_cfg, file_root=str(file_root), files=mine,
                 labels=ys, layout=layout_of(channels_last))
    try:
        for k in range(math.ceil(len(mine) / batch_size)):
            try:
                x, y = pipe.run()
            except RuntimeError as exc:
                window = mine[k * batch_size:(k + data_cfg.prefetch + 2) * batch_size]
                raise decode_error(exc, file_root, window, "DALI val pipeline") from None
            n = min(batch_size, len(mine) - k * batch_size)
            x = as_nchw(to_torch(x, device), channels_last)[:n]
            yield {"x": x, "y": to_torch(y, device).reshape(-1).long()[:n]}
    finally:
        del pipe


def dali_definitions() -> dict[str, Callable]:
    """The pipeline definitions, imported only when the DALI backend is used."""
    import_dali()
    from dali_pipelines.labeled import labeled_pipeline
    from dali_pipelines.unlabeled import unlabeled_pipeline

    return {LABELED_KIND: labeled_pipeline, "unlabeled": unlabeled_pipeline}
