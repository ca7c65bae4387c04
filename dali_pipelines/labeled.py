"""Labeled stream: weak view (RandomResizedCrop + flip), normalised, and the bank index."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nvidia.dali import fn, pipeline_def

from dali_pipelines.common import ASPECT, decoder_args, normalize, read_files


@pipeline_def(enable_checkpointing=True)
def labeled_pipeline(cfg: Any, file_root: str, files: list[str], indices: list[int],
                     device: str = "cpu", layout: str = "CHW", source: Callable | None = None):
    """Outputs (x, index): `index` is the file's position in the labeled list (its bank slot).

    Decoding and cropping are fused (`image_random_crop` decodes only the crop window), then
    the window is resized to crop_size; the flip happens inside the normalisation.
    """
    jpegs, index = read_files(file_root, files, indices, source=source)
    images = fn.decoders.image_random_crop(jpegs, random_area=(cfg.min_scale, cfg.max_scale),
                                           random_aspect_ratio=ASPECT, num_attempts=10,
                                           **decoder_args(cfg, device))
    images = fn.resize(images, size=(cfg.crop_size, cfg.crop_size))
    x = normalize(images, cfg, layout, mirror=fn.random.coin_flip(probability=0.5))
    if device == "gpu":
        index = index.gpu()
    return x, index
