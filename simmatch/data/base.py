"""What every backend's training stream shares: the batch layout and the resume bookkeeping."""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from simmatch.data.sharding import ShardPlan
from simmatch.errors import CheckpointError, DataError, ImageError
from simmatch.images.source import ImageSource

LABELED_KIND, UNLABELED_KIND = "labeled", "unlabeled"


def pack_batch(kind: str, views: list[torch.Tensor], index: torch.Tensor,
               label_table: torch.Tensor) -> dict[str, Any]:
    """The batch dict of ARCHITECTURE.md: labeled {x, y, index}; unlabeled {weak, strong, y, index}.

    `y` is looked up from the index (bank slot or unlabeled position), so it can never drift
    from `bank_labels`; -1 marks an unknown class.
    """
    index = index.reshape(-1).long()
    y = label_table[index]
    if kind == LABELED_KIND:
        return {"x": views[0], "y": y, "index": index}
    return {"weak": views[0], "strong": list(views[1:]), "y": y, "index": index}


def decode_error(reason: str, source: ImageSource, candidates: list[str], what: str) -> DataError:
    """Name the image among `candidates` that does not decode (a pipeline's or a worker's own
    message does not name it) as an ImageError carrying its path; `reason` is the backend's own
    explanation, used when every candidate decodes."""
    from simmatch.images.decode import source_problem

    for rel in dict.fromkeys(candidates):
        problem = source_problem(source, rel)
        if problem is not None:
            return ImageError(f"cannot decode image {source.where(rel)}: {problem}", rel)
    return DataError(f"{what} failed (every image of the batch decodes): {reason}")


def with_drop_hint(error: DataError, kind: str) -> DataError:
    """The error of an unlabeled image that stops the run, saying how to go on without it
    (simmatch/run/dropped.py) and marked `droppable` with its path; others as they are (labeled
    and val images must be restored)."""
    if kind != UNLABELED_KIND or not isinstance(error, ImageError):
        return error
    hinted = ImageError(f"{error}; to go on without it, write {error.rel} (as RUN_DIR/splits/unlabeled.txt names "
                        f"it) into a file and start the run again with --drop-images FILE", error.rel)
    hinted.droppable = error.rel  # type: ignore[attr-defined]  # data.max_bad_images drops it by itself
    return hinted


def val_resize_size(data_cfg: Any) -> int:
    """Shorter side in pixels before the centre crop (data.val_resize; see DataConfig.val_resize_px)."""
    return data_cfg.val_resize_px()


def as_nchw(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """NHWC storage seen as NCHW (channels_last strides, no copy), or NCHW as it is."""
    return x.permute(0, 3, 1, 2) if channels_last else x


class TrainStream:
    """An endless iterator of full batches with an exact, savable position.

    Subclasses implement `__next__`, `_position()` -> (epoch, batch in epoch, extra state)
    and `_seek(epoch, batch, extra)`. `state_dict()` holds only ints, strings, bytes and
    None, so it loads with torch.load(weights_only=True).
    """

    kind: str
    plan: ShardPlan

    def __init__(self, kind: str, plan: ShardPlan) -> None:
        self.kind = kind
        self.plan = plan
        self._marked: tuple[int, int] | None = None

    @property
    def batch_size(self) -> int:
        return self.plan.batch_size

    @property
    def batches_per_epoch(self) -> int:
        return self.plan.batches_per_epoch

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self._position()[0]

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> dict[str, Any]:
        raise NotImplementedError

    def _position(self) -> tuple[int, int, dict]:
        raise NotImplementedError

    def _seek(self, epoch: int, batch: int, extra: dict) -> None:
        raise NotImplementedError

    def _coordinates(self) -> tuple[int, int]:
        """(epoch, batch) of the next batch, without the costlier extra state."""
        return self._position()[:2]

    def _replay_extra(self) -> dict:
        """The extra state of a position reached by drawing again from its segment's start
        (a pipeline's own state is not known for it)."""
        return {}

    def mark(self) -> None:
        """Remember the position before a training step draws (cheap: no pipeline state)."""
        self._marked = self._coordinates()

    def state_at_mark(self) -> dict[str, Any]:
        """The state as it was at `mark()`, for a step that stopped before it could finish (an
        image of another stream failed): this state when nothing was drawn since, else the
        marked position, which a resumed stream reaches again by replaying its segment."""
        if self._marked is None or self._coordinates() == self._marked:
            return self.state_dict()
        epoch, batch = self._marked
        return {"kind": self.kind, "plan": self.plan.fingerprint(), "epoch": epoch, "batch": batch,
                **self._replay_extra()}

    def state_dict(self) -> dict[str, Any]:
        epoch, batch, extra = self._position()
        return {"kind": self.kind, "plan": self.plan.fingerprint(), "epoch": epoch, "batch": batch,
                **extra}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was saved. A position saved under another world size
        or per-rank batch (any rank's: they read in lockstep) continues at the first item of the
        epoch that no rank had read (see sharding); another item sequence restarts its epoch."""
        if state.get("kind") != self.kind:
            raise CheckpointError(f"data position of a '{state.get('kind')}' stream given to "
                                  f"the '{self.kind}' stream")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        extra = {k: v for k, v in state.items() if k not in ("kind", "plan", "epoch", "batch")}
        saved = state.get("plan") or {}
        if self.plan.same_items(saved):
            own = self.plan.with_tail(*ShardPlan.tail_of(saved))
            if saved == own.fingerprint():  # the same layout: bit-exact
                self.plan = own
                self._seek(epoch, batch, extra)
                return
            old = dataclasses.replace(self.plan, batch_size=int(saved["batch_size"]), rank=int(saved["rank"]),
                                      world_size=int(saved["world_size"])).with_tail(*ShardPlan.tail_of(saved))
            self._continue_elastic(epoch, old.consumed(epoch, batch))
            return
        warnings.warn(f"{self.kind} stream: saved data position is for {saved}, "
                      f"now {self.plan.fingerprint()}; restarting epoch {epoch}", stacklevel=2)
        self._seek(epoch, 0, {})

    def _continue_elastic(self, epoch: int, consumed: int) -> None:
        """Read the rest of `epoch` (from item `consumed` of its order) in this layout."""
        plan = self.plan.with_tail(epoch, consumed)
        if consumed >= plan.num_items or plan.batches_in(epoch) == 0:  # nothing left (drop_last)
            plan, epoch = self.plan.with_tail(epoch + 1, 0), epoch + 1
        self.plan = plan
        self._seek(epoch, 0, {})

    def close(self) -> None:
        """Release workers or pipelines; the stream reopens itself on the next draw."""
