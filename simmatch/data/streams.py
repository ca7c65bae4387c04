"""`build_streams`: the training streams of each rank a process runs and its validation passes, any backend."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from simmatch.config import Config, Scale
from simmatch.data.base import LABELED_KIND, UNLABELED_KIND, TrainStream
from simmatch.data.sharding import LABELED, UNLABELED, ShardPlan
from simmatch.data.splits import Splits, load_splits
from simmatch.errors import ConfigError
from simmatch.images.source import ImageSource


@dataclass
class RankStreams:
    """The two training streams of one rank of the run (a virtual rank under virtual ranks)."""

    rank: int
    labeled: TrainStream
    unlabeled: TrainStream

    def state_dict(self) -> dict[str, Any]:
        return {"labeled": self.labeled.state_dict(), "unlabeled": self.unlabeled.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.labeled.load_state_dict(state["labeled"])
        self.unlabeled.load_state_dict(state["unlabeled"])

    def mark(self) -> None:
        """Before a training step draws (TrainStream.mark); a plain iterator of batches has no
        position to keep."""
        for stream in (self.labeled, self.unlabeled):
            if isinstance(stream, TrainStream):
                stream.mark()

    def state_at_mark(self) -> dict[str, Any]:
        """The positions as they were at `mark()` (TrainStream.state_at_mark)."""
        return {"labeled": self.labeled.state_at_mark(), "unlabeled": self.unlabeled.state_at_mark()}

    def close(self) -> None:
        self.labeled.close()
        self.unlabeled.close()


@dataclass
class Streams:
    """One process's data: the training streams of each rank it runs (one, or its virtual
    ranks), the validation passes of its share and the split facts."""

    train: list[RankStreams]
    num_labeled: int  # K, the bank size
    num_unlabeled: int
    num_val: int
    num_classes: int
    bank_labels: torch.Tensor  # [K] int64, class of each bank slot (= labeled list line)
    split_texts: dict[str, str]  # name -> content of each split list used (kept in the checkpoints)
    backend: str
    device: str  # where decoding/augmentation runs: gpu | cpu
    classes: list[str] = field(default_factory=list)
    # name -> files of the labeled (bank order) and unlabeled lists: RUN_DIR/splits/<name>.txt
    split_lists: dict[str, list[str]] = field(default_factory=dict)
    # the images decoded before the first step (data.check_images): every val and labeled image
    check_files: list[tuple[ImageSource, str]] = field(default_factory=list)
    _val: Callable[[], Iterator[dict[str, torch.Tensor]]] | None = None
    _labeled_eval: Callable[[], Iterator[dict[str, torch.Tensor]]] | None = None

    def val(self) -> Iterator[dict[str, torch.Tensor]]:
        """A fresh pass over this rank's share of the validation set: {x, y} batches.

        Ranks hold disjoint contiguous slices (every image exactly once over all ranks, no
        padding); batch counts may differ by one between ranks and the last one is partial.
        """
        return self._val() if self._val is not None else iter(())

    def labeled_eval(self) -> Iterator[dict[str, torch.Tensor]]:
        """The labeled set with validation transforms, sharded like `val`: the memory of k-NN
        evaluation and the training set of linear probes."""
        return self._labeled_eval() if self._labeled_eval is not None else iter(())

    @property
    def labeled(self) -> TrainStream:
        """The first (or only) rank's labeled stream."""
        return self.train[0].labeled

    @property
    def unlabeled(self) -> TrainStream:
        """The first (or only) rank's unlabeled stream."""
        return self.train[0].unlabeled

    def close(self) -> None:
        for rank in self.train:
            rank.close()
        for passes in (self._val, self._labeled_eval):
            getattr(passes, "close", lambda: None)()


def resolve_device(choice: str) -> str:
    """data.device: auto -> gpu when CUDA is available, else cpu."""
    if choice == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if choice == "gpu" and not torch.cuda.is_available():
        raise ConfigError("data.device=gpu but CUDA is not available (use data.device=cpu or auto)")
    return choice


def val_batch(cfg: Config, scale: Scale) -> int:
    """Validation images per rank per pass step: data.val_batch, or the per-rank unlabeled batch."""
    return cfg.data.val_batch if cfg.data.val_batch > 0 else scale.unlabeled_per_rank


def _split_texts(cfg: Config, splits: Splits) -> dict[str, str]:
    """The contents of the lists used (a checkpoint keeps them)."""
    texts = {"labeled": "".join(f + "\n" for f in splits.labeled_files)}
    if cfg.data.unlabeled_list:
        texts["unlabeled"] = "".join(f + "\n" for f in splits.unlabeled_files)
    return texts


def build_streams(cfg: Config, scale: Scale, ranks: Sequence[int], process: int, device: torch.device,
                  frozen_splits: str | Path | None = None) -> Streams:
    """The streams of process `process` of a run at `scale` (config.derive_scale: its ranks, the
    processes that compute them, the batches), delivering tensors on `device`: training streams for
    each of `ranks`, the run's ranks this process computes (the engine decides: itself, or its
    virtual ranks, each reading what that rank of a run on as many GPUs reads), validation passes
    over its share of the processes.

    `frozen_splits`: the `splits/` folder of a run being resumed, whose lists are used
    instead of the config's (see `load_splits`).

    Backends: dali (decoding/augmenting on GPU or, with data.device=cpu, on DALI's CPU
    operators), torch (torchvision + DataLoader), synthetic (random tensors, no I/O). Nothing
    is decoded until a stream is first drawn from.
    """
    data = cfg.data
    device = torch.device(device)
    b, bu, bv = scale.batch_per_rank, scale.unlabeled_per_rank, val_batch(cfg, scale)
    seed = cfg.train.seed
    channels_last = cfg.train.channels_last
    rank, world_size = process, scale.physical_world_size  # the validation passes are the processes'
    mine, ranks = list(ranks), scale.world_size  # the run's ranks (virtual ones included)
    if data.backend == "synthetic":
        return _synthetic(cfg, rank, world_size, device, b, bu, bv, ranks, mine)
    where = resolve_device(data.device) if data.backend == "dali" else "cpu"  # torch: CPU workers
    splits = load_splits(data, frozen=frozen_splits)
    bank_labels = torch.tensor(splits.labeled_labels, dtype=torch.int64)
    unl_labels = torch.tensor(splits.unlabeled_labels, dtype=torch.int64)
    drop = cfg.train.partial_batch == "drop"

    def plans(r: int) -> tuple[ShardPlan, ShardPlan]:
        return (ShardPlan(len(splits.labeled_files), b, r, ranks, seed, LABELED, drop),
                ShardPlan(len(splits.unlabeled_files), bu, r, ranks, seed, UNLABELED, drop))

    if data.backend == "dali":
        from simmatch.data.dali_backend import DaliTrainStream, DaliValPasses, dali_definitions

        defs = dali_definitions(splits.train_source)

        def rank_streams(r: int) -> RankStreams:
            plan_l, plan_u = plans(r)
            return RankStreams(
                r, DaliTrainStream(LABELED_KIND, defs[LABELED_KIND], data, plan_l, splits.train_source,
                                   splits.labeled_files, bank_labels, device, where, channels_last),
                DaliTrainStream(UNLABELED_KIND, defs[UNLABELED_KIND], data, plan_u, splits.train_source,
                                splits.unlabeled_files, unl_labels, device, where, channels_last))

        def passes(source: ImageSource, files: list[str], labels: list[int]):
            return DaliValPasses(data, source, files, labels, bv, rank, world_size, device, where,
                                 channels_last)  # one pipeline per list for the whole run
    elif data.backend == "torch":
        from simmatch.data.torch_backend import TorchTrainStream, torch_val_batches

        def rank_streams(r: int) -> RankStreams:
            plan_l, plan_u = plans(r)
            return RankStreams(
                r, TorchTrainStream(LABELED_KIND, data, plan_l, splits.train_source,
                                    splits.labeled_files, bank_labels, device, channels_last),
                TorchTrainStream(UNLABELED_KIND, data, plan_u, splits.train_source,
                                 splits.unlabeled_files, unl_labels, device, channels_last))

        def passes(source: ImageSource, files: list[str], labels: list[int]):
            return lambda: torch_val_batches(data, source, files, labels, bv, rank, world_size,
                                             device, channels_last)
    else:
        raise ConfigError(f"data.backend={data.backend!r} is not one of dali, torch, synthetic")
    return Streams([rank_streams(r) for r in mine], len(splits.labeled_files), len(splits.unlabeled_files),
                   len(splits.val_files), data.num_classes, bank_labels, _split_texts(cfg, splits),
                   data.backend, where, list(splits.classes),
                   {"labeled": splits.labeled_files, "unlabeled": splits.unlabeled_files},
                   [(splits.val_source, f) for f in splits.val_files]
                   + [(splits.train_source, f) for f in splits.labeled_files],
                   passes(splits.val_source, splits.val_files, splits.val_labels),
                   passes(splits.train_source, splits.labeled_files, splits.labeled_labels))


def _synthetic(cfg: Config, rank: int, world_size: int, device: torch.device, b: int, bu: int,
               bv: int, ranks: int, mine: list[int]) -> Streams:
    from simmatch.data.synthetic import SyntheticTrainStream, synthetic_labels, synthetic_val_batches

    data, seed, cl = cfg.data, cfg.train.seed, cfg.train.channels_last
    n, drop = data.synthetic_size, cfg.train.partial_batch == "drop"
    labels = synthetic_labels(n, data.num_classes)

    def rank_streams(r: int) -> RankStreams:
        return RankStreams(
            r, SyntheticTrainStream(LABELED_KIND, data, ShardPlan(n, b, r, ranks, seed, LABELED, drop),
                                    labels, device, cl),
            SyntheticTrainStream(UNLABELED_KIND, data, ShardPlan(n, bu, r, ranks, seed, UNLABELED, drop),
                                 labels, device, cl))

    def val() -> Iterator[dict[str, torch.Tensor]]:
        return synthetic_val_batches(data, n, bv, rank, world_size, device, cl)

    return Streams([rank_streams(r) for r in mine], n, n, n, data.num_classes, labels, {}, "synthetic",
                   device.type.replace("cuda", "gpu"), [str(c) for c in range(data.num_classes)],
                   {}, [], val, val)
