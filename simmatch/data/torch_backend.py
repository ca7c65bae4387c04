"""torchvision (transforms.v2) + DataLoader streams with the same augmentations and interface.

Exact resume without replaying images: every sample's augmentation is seeded from
(seed, stream, epoch, GLOBAL rank, position in the epoch), so a position (epoch, batch) is
all the state there is, and skipping batches only skips sampler entries.
"""
from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from simmatch.data.base import TrainStream, decode_error, pack_batch, val_resize_size, with_drop_hint
from simmatch.data.sharding import ShardPlan, val_slice
from simmatch.errors import DataError, ImageError
from simmatch.images.decode import problem_text
from simmatch.images.source import ImageSource

_ERROR_PREFIXES = ("simmatch.errors.DataError: ", "simmatch.errors.ImageError: ")


def _v2():
    from torchvision.transforms import v2

    return v2


def _finish(cfg: Any) -> list:
    """PIL image or uint8 tensor -> normalised float32 CHW."""
    v2 = _v2()
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=cfg.mean, std=cfg.std)]


def _crop_flip(cfg: Any, size: int | None = None, scale: tuple[float, float] | None = None) -> list:
    """RandomResizedCrop (by default crop_size, [min_scale, max_scale]) and a horizontal flip."""
    v2 = _v2()
    return [v2.RandomResizedCrop(size or cfg.crop_size, scale=scale or (cfg.min_scale, cfg.max_scale),
                                 antialias=True),
            v2.RandomHorizontalFlip()]


def ignore_time_limit_signal(_worker_id: int) -> None:
    """SLURM sends the time-limit warning (USR2) to every process of a task, and Ctrl-C (SIGINT)
    reaches every process of the terminal's foreground group; only the trainer acts on them
    (a worker that exits on Ctrl-C would break the save the trainer then makes). SIGTERM keeps
    its default: the DataLoader stops its workers with it at exit, so a worker that ignored it
    would hang the exit (docs/SLURM.md: workers and preemption)."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class RandomPILBlur:
    """Gaussian blur with probability p, sigma ~ U[lo, hi] (PIL's, as in MoCo/SimMatch code).

    Draws from torch's RNG so the per-sample seeding covers it.
    """

    def __init__(self, p: float, lo: float, hi: float) -> None:
        self.p, self.lo, self.hi = p, lo, hi

    def __call__(self, img):
        from PIL import ImageFilter

        if torch.rand(()) >= self.p:
            return img
        sigma = self.lo + (self.hi - self.lo) * float(torch.rand(()))
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))


def translate_pad(cfg: Any) -> int:
    """Pixels of reflect padding of the translated views (data.augment=translate): up to
    data.translate of the side in each direction (4 px at 32 px, 12 px at 96 px)."""
    from dali_pipelines.ra_list import pad_for

    return pad_for(cfg.crop_size, cfg.translate)


def weak_transform(cfg: Any):
    """Crop and flip on the uint8 tensor (faster than on PIL), then normalise; or, for small
    images (data.augment=translate), flip and reflect-padded translation (small_augment.py)."""
    v2 = _v2()
    if cfg.augment == "translate":
        from simmatch.data.small_augment import WeakView

        return v2.Compose([WeakView(translate_pad(cfg), cfg.flip)] + _finish(cfg))
    return v2.Compose([v2.ToImage()] + _crop_flip(cfg) + _finish(cfg)[1:])


def strong_transform(cfg: Any, size: int | None = None, scale: tuple[float, float] | None = None):
    """SimCLR-style (jitter p, grayscale p, blur p, solarize p) on PIL images, whose colour ops
    are several times faster than the tensor ones; or RandAugment(n, m) on the tensor; after
    crop (of `size` px and `scale`, multi-crop) + flip."""
    v2 = _v2()
    if cfg.augment == "translate":  # data.strong=fixmatch_ra (config validation)
        from simmatch.data.small_augment import StrongView

        return v2.Compose([StrongView(translate_pad(cfg), cfg.flip, cfg.randaug_n, cfg.cutout)] + _finish(cfg))
    if cfg.strong == "randaugment":
        return v2.Compose([v2.ToImage()] + _crop_flip(cfg)
                          + [v2.RandAugment(num_ops=cfg.randaug_n, magnitude=cfg.randaug_m)]
                          + _finish(cfg)[1:])
    return v2.Compose(_crop_flip(cfg, size, scale) + simclr_colour_ops(cfg) + _finish(cfg))


def simclr_colour_ops(cfg: Any) -> list:
    """ColorJitter (factors and a random op order per image) with p jitter_prob, grayscale
    with p gray_prob, blur with p blur_prob, solarize (PIL's, threshold 128) with p
    solarize_prob: the distribution dali_pipelines/color.py matches."""
    v2 = _v2()
    ops = [v2.RandomApply([v2.ColorJitter(cfg.jitter, cfg.jitter, cfg.saturation, cfg.hue)],
                          p=cfg.jitter_prob),
           v2.RandomGrayscale(p=cfg.gray_prob),
           RandomPILBlur(cfg.blur_prob, cfg.blur_sigma_min, cfg.blur_sigma_max)]
    if cfg.solarize_prob > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=cfg.solarize_prob))
    return ops


def val_transform(cfg: Any):
    v2 = _v2()
    if cfg.augment == "translate":  # small images are evaluated as they are
        return v2.Compose(_finish(cfg))
    return v2.Compose([v2.ToImage(), v2.Resize(val_resize_size(cfg), antialias=True),
                       v2.CenterCrop(cfg.crop_size)] + _finish(cfg)[1:])


def load_image(source: ImageSource, rel: str):
    """RGB PIL image, fully decoded; an image that does not decode is a DataError naming it (a
    damaged shard is one already, naming the shard)."""
    from PIL import Image

    if source.kind == "arrays":  # pixels already (an archive's): nothing to decode
        return Image.fromarray(source.pixels(rel))
    encoded = source.open(rel)
    try:
        with Image.open(encoded) as img:
            return img.convert("RGB")
    except Exception as exc:
        raise ImageError(f"cannot decode image {source.where(rel)}: {problem_text(exc)}", rel) from None


class _Views(Dataset):
    """Item (file index, sample seed) -> (views..., index); one decode, views seeded by the sample."""

    def __init__(self, source: ImageSource, files: list[str], transforms: list) -> None:
        self.source, self.files, self.transforms = source, files, transforms

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        image = load_image(self.source, self.files[index])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            views = [t(image) for t in self.transforms]
        return (*views, index)


class _EpochSampler(Sampler):
    """Yields (file index, sample seed) of one epoch for this rank, from a batch offset on."""

    def __init__(self, plan: ShardPlan) -> None:
        self.plan = plan
        self.keys: list[tuple[int, int]] = []
        self.start_batch = 0  # the batch of the epoch that keys[0] begins

    def set_epoch(self, plan: ShardPlan, epoch: int, start_batch: int) -> None:
        self.plan = plan
        order = plan.rank_order(epoch)
        key = [plan.seed, plan.tag, epoch, plan.rank]
        if plan.offset(epoch):  # an elastic resume's first epoch: its own sample seeds
            key += [plan.world_size, plan.offset(epoch)]
        seeds = np.random.default_rng(key).integers(0, 2**62, size=len(order))
        start = start_batch * plan.batch_size
        self.keys = list(zip(order[start:].tolist(), seeds[start:].tolist()))
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def reraise_worker_error(exc: Exception) -> None:
    """A DataError raised in a worker arrives wrapped in a traceback: keep its own line only."""
    lines = [ln.split(": ", 1)[1] for ln in str(exc).splitlines() if ln.startswith(_ERROR_PREFIXES)]
    if lines:
        raise DataError(lines[-1]) from None
    raise exc


class TorchTrainStream(TrainStream):
    def __init__(self, kind: str, data_cfg: Any, plan: ShardPlan, source: ImageSource,
                 files: list[str], label_table: torch.Tensor, device: torch.device,
                 channels_last: bool) -> None:
        super().__init__(kind, plan)
        transforms = [weak_transform(data_cfg)]
        if kind != "labeled":
            transforms += [strong_transform(data_cfg, size, (low, high))
                           for size, low, high in data_cfg.strong_crops()]
        self._sampler = _EpochSampler(plan)
        workers = max(0, data_cfg.num_threads)
        self._loader = DataLoader(
            _Views(source, files, transforms), batch_size=plan.batch_size,
            sampler=self._sampler, num_workers=workers, pin_memory=device.type == "cuda",
            persistent_workers=workers > 0, worker_init_fn=ignore_time_limit_signal,
            prefetch_factor=max(1, data_cfg.prefetch) if workers else None)
        self._labels = label_table.to(device)
        self._device = device
        self._source = source
        self._cfg = data_cfg
        self._channels_last = channels_last
        self._epoch, self._batch = 0, 0
        self._it: Iterator | None = None

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._sampler.set_epoch(self.plan, self._epoch, self._batch)
            self._it = iter(self._loader)
        try:
            *views, index = next(self._it)
        except Exception as exc:
            self.close()
            try:
                reraise_worker_error(exc)
            except ImageError as error:  # read in this process (no workers): it names its image
                raise with_drop_hint(error, self.kind) from None
            except DataError as error:  # a worker's: its text names the image, find which one
                raise with_drop_hint(self._bad_image(str(error)), self.kind) from None
        self._batch += 1
        if self._batch == self.plan.batches_in(self._epoch):
            self._epoch, self._batch, self._it = self._epoch + 1, 0, None
        memory = torch.channels_last if self._channels_last else torch.contiguous_format
        views = [v.to(self._device, non_blocking=True).contiguous(memory_format=memory)
                 for v in views]
        # pinned by the DataLoader on CUDA: the copy does not make the host wait
        return pack_batch(self.kind, views, index.to(self._device, non_blocking=True), self._labels)

    def _bad_image(self, reason: str) -> DataError:
        """The image of the batch being drawn (or of those the workers read ahead) that does not
        decode, named with its path, from a worker's error text."""
        b = self.plan.batch_size
        ahead = (max(1, self._cfg.prefetch) * max(1, self._cfg.num_threads) + 1) * b
        keys = self._sampler.keys[(self._batch - self._sampler.start_batch) * b:][:ahead]
        files = self._loader.dataset.files
        return decode_error(reason, self._source, [files[i] for i, _ in keys], f"{self.kind} stream")

    def _position(self) -> tuple[int, int, dict]:
        return self._epoch, self._batch, {}

    def _seek(self, epoch: int, batch: int, extra: dict) -> None:
        self._it = None
        self._epoch, self._batch = epoch, batch

    def close(self) -> None:
        self._it = None


class _ValSet(Dataset):
    def __init__(self, source: ImageSource, files: list[str], labels: list[int], transform) -> None:
        self.source, self.files, self.labels, self.transform = source, files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self.transform(load_image(self.source, self.files[i])), self.labels[i]


def torch_val_batches(data_cfg: Any, source: ImageSource, files: list[str], labels: list[int],
                      batch_size: int, rank: int, world_size: int, device: torch.device,
                      channels_last: bool) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's contiguous slice of the validation set, each image once; last batch partial."""
    start, stop = val_slice(len(files), rank, world_size)
    if start == stop:
        return
    dataset = _ValSet(source, files[start:stop], labels[start:stop], val_transform(data_cfg))
    workers = max(0, data_cfg.num_threads)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda", worker_init_fn=ignore_time_limit_signal)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    it = iter(loader)
    while True:
        try:
            x, y = next(it)
        except StopIteration:
            return
        except Exception as exc:
            reraise_worker_error(exc)
        yield {"x": x.to(device, non_blocking=True).contiguous(memory_format=memory),
               "y": y.to(device, non_blocking=True).long()}
