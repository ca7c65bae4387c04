"""Pieces shared by the stream pipelines: device choice, decoding, normalisation, building.

One definition serves both backends: `device="gpu"` decodes with nvJPEG (`mixed`, the
hardware decoder taking `hw_decoder_load` of the images) and augments on the GPU;
`device="cpu"` runs every operator on the CPU with `device_id=None`, which needs no CUDA.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline, do_not_convert

MIB = 1 << 20
ASPECT = (3.0 / 4.0, 4.0 / 3.0)


def check_device(device: str) -> None:
    if device not in ("gpu", "cpu"):
        raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")


@do_not_convert
def decoder_args(cfg: Any, device: str) -> dict:
    """Keyword arguments of the image decoders for `device`.

    GPU: the hardware decoder pre-allocates for a `decoder_width_hint` x `decoder_height_hint`
    image; nvJPEG's pinned host buffers (two per thread) and device buffer (one per thread)
    start at `host_padding_mb` / `device_padding_mb` and grow only for a larger image.
    NVIDIA's ImageNet examples pad with 134 / 201 MiB, which pins about 1 GiB per decoder at
    4 threads, 3 GiB per rank: see `dali_pinned_estimate`.
    """
    if device == "gpu":
        return {"device": "mixed", "output_type": types.RGB, "hw_decoder_load": cfg.hw_decoder_load,
                "preallocate_width_hint": cfg.decoder_width_hint,
                "preallocate_height_hint": cfg.decoder_height_hint,
                "device_memory_padding": cfg.device_padding_mb * MIB,
                "host_memory_padding": cfg.host_padding_mb * MIB}
    return {"device": "cpu", "output_type": types.RGB}


def dali_pinned_estimate(cfg: Any, decoders: int) -> int:
    """Bytes of pinned host memory the GPU decoders reserve up front: 2 buffers per thread
    (DALI's documented double-buffering) of `host_padding_mb` each, per decoder. DALI reports
    no pinned-memory statistic, so this is computed, not measured."""
    return decoders * cfg.num_threads * 2 * cfg.host_padding_mb * MIB


@do_not_convert
def read_files(file_root: str, files: list[str], labels: list[int], name: str = "reader",
               pad_last_batch: bool = False, source: Callable | None = None):
    """(encoded images, label) of `files` in the given order (the order is ours: no reader
    shuffling or sharding), read by DALI's file reader; or, with `source`, the batches a
    callable of BatchInfo returns (the bytes of a shard set, in the same order).

    The two graphs must give the same augmentations: DALI hands its random seeds to the operators
    that draw one in graph order, and the file reader draws one (unused, it does not shuffle)
    where an external source draws none. An empty random tensor joined to the bytes takes that
    seed, so every later operator gets the seed it gets with the file reader.
    """
    if source is None:
        return fn.readers.file(file_root=file_root, files=files, labels=labels, random_shuffle=False,
                               pad_last_batch=pad_last_batch, name=name)
    jpegs, label = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                      dtype=[types.UINT8, types.INT32])
    seed_taker = fn.random.coin_flip(probability=0.0, shape=(0,), dtype=types.UINT8)
    return fn.cat(seed_taker, jpegs, axis=0), label


@do_not_convert
def normalize(images, cfg: Any, layout: str, mirror=None, crop: tuple[int, int] | None = None):
    """uint8 HWC -> float32 `layout` ("CHW" or "HWC"), (x/255 - mean)/std, optional flip/crop."""
    kwargs: dict = {"dtype": types.FLOAT, "output_layout": layout,
                    "mean": [m * 255.0 for m in cfg.mean], "std": [s * 255.0 for s in cfg.std]}
    if mirror is not None:
        kwargs["mirror"] = mirror
    if crop is not None:
        kwargs.update(crop=crop, crop_pos_x=0.5, crop_pos_y=0.5)
    return fn.crop_mirror_normalize(images, **kwargs)


@do_not_convert
def random_crop(images, cfg: Any, size: int | None = None, scale: tuple[float, float] | None = None):
    """RandomResizedCrop(size, scale, ratio 3/4..4/3); by default crop_size, [min_scale, max_scale]."""
    size = size or cfg.crop_size
    return fn.random_resized_crop(images, size=(size, size),
                                  random_area=scale or (cfg.min_scale, cfg.max_scale),
                                  random_aspect_ratio=ASPECT, num_attempts=10)


def layout_of(channels_last: bool) -> str:
    """HWC batches are NCHW tensors in channels_last memory once permuted: no extra copy."""
    return "HWC" if channels_last else "CHW"


@contextlib.contextmanager
def quiet_dali_deprecations() -> Iterator[None]:
    """Drop the DeprecationWarnings that DALI's own auto_aug code emits while a graph is defined.

    DALI forces the "default" filter around those warnings, so a filter cannot silence them;
    the display hook is wrapped instead (pytest's recording goes through it too).
    """
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DeprecationWarning) and "nvidia/dali" in str(filename):
            return
        previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def build(definition: Callable[..., Pipeline], *, device: str, device_id: int | None,
          batch_size: int, num_threads: int, seed: int, prefetch: int,
          checkpoint: bytes | str | None = None, **kwargs: Any) -> Pipeline:
    """Instantiate and build `definition` for `device` (device_id is ignored on the CPU)."""
    check_device(device)
    with quiet_dali_deprecations():
        pipe = definition(batch_size=batch_size, num_threads=num_threads,
                          device_id=device_id if device == "gpu" else None, seed=seed,
                          prefetch_queue_depth=max(1, prefetch), checkpoint=checkpoint,
                          device=device, **kwargs)
        pipe.build()
    return pipe
