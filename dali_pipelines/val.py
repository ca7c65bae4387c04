"""Validation stream: resize the shorter side, center crop, normalise; labels are classes."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nvidia.dali import fn, pipeline_def

from dali_pipelines.common import decoder_args, normalize, read_files


@pipeline_def(enable_checkpointing=False)
def val_pipeline(cfg: Any, file_root: str, files: list[str], labels: list[int],
                 resize_shorter: int, device: str = "cpu", layout: str = "CHW",
                 source: Callable | None = None):
    """Outputs (x, y). The last batch is padded by the reader; the caller trims it.

    `resize_shorter` (the caller's val_resize_size) is passed in: the pipelines sit below
    simmatch and import nothing from it.
    """
    jpegs, y = read_files(file_root, files, labels, pad_last_batch=True, source=source)
    images = fn.decoders.image(jpegs, **decoder_args(cfg, device))
    images = fn.resize(images, resize_shorter=resize_shorter)
    x = normalize(images, cfg, layout, crop=(cfg.crop_size, cfg.crop_size))
    if device == "gpu":
        y = y.gpu()
    return x, y
