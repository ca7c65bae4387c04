"""The streams of images held as pixels (CIFAR, SVHN, STL-10 archives: data.format cifar10 ...):
nothing to decode, the views of data.augment=translate (small_augment.py), normalised.

The external source hands each batch over as uint8 HWC arrays with their indices (labels for
validation). The augmentations run on DALI's CPU operators (Equalize is a numpy function, and
32-px images are too small to gain from a GPU); with device="gpu" the views are normalised on
the GPU, so the batch arrives there as the ImageNet pipelines' do. The definitions take the
ImageNet pipelines' arguments too (the streams build either kind alike); the files are the source's.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import do_not_convert

from dali_pipelines.common import normalize
from dali_pipelines.ra_list import pad_for
from dali_pipelines.small_augment import strong, weak


@do_not_convert
def read_pixels(source: Callable):
    """(uint8 HWC images, int32 index or label) of the batches `source` returns for DALI's BatchInfo."""
    return fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                              dtype=[types.UINT8, types.INT32], layout=["HWC", ""])


@do_not_convert
def translate_pad(cfg: Any) -> int:
    """Reflect padding of the translated views: data.translate of the side (as the torch backend)."""
    return pad_for(cfg.crop_size, cfg.translate)


@do_not_convert
def _finish(view, cfg: Any, layout: str, device: str):
    return normalize(view.gpu() if device == "gpu" else view, cfg, layout)


@pipeline_def(enable_conditionals=True, enable_checkpointing=True)
def array_labeled_pipeline(cfg: Any, source: Callable, device: str = "cpu", layout: str = "CHW",
                           file_root: str = "", files: list | None = None, indices: list | None = None):
    """Outputs (x, index): the weak view of each labeled image and its bank slot."""
    images, index = read_pixels(source)
    x = _finish(weak(images, translate_pad(cfg), cfg.flip), cfg, layout, device)
    return x, index.gpu() if device == "gpu" else index


@pipeline_def(enable_conditionals=True, enable_checkpointing=True)
def array_unlabeled_pipeline(cfg: Any, source: Callable, device: str = "cpu", layout: str = "CHW",
                             file_root: str = "", files: list | None = None, indices: list | None = None):
    """Outputs (weak, strong_1..strong_k, index), each view with its own draws."""
    images, index = read_pixels(source)
    pad = translate_pad(cfg)
    views = [weak(images, pad, cfg.flip)]
    views += [strong(images, pad, cfg.flip, cfg.randaug_n, cfg.cutout) for _ in range(cfg.num_strong)]
    outputs = [_finish(v, cfg, layout, device) for v in views]
    return (*outputs, index.gpu() if device == "gpu" else index)


@pipeline_def(enable_checkpointing=False)
def array_val_pipeline(cfg: Any, source: Callable, device: str = "cpu", layout: str = "CHW",
                       file_root: str = "", files: list | None = None, labels: list | None = None,
                       resize_shorter: int = 0):
    """Outputs (x, y): the images as they are, normalised."""
    images, y = read_pixels(source)
    return _finish(images, cfg, layout, device), y.gpu() if device == "gpu" else y
