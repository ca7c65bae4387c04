"""Unlabeled stream: one decode, a weak view and `num_strong` strong views (multi-crop: of
several sizes) per image."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import do_not_convert

from dali_pipelines import color
from dali_pipelines.common import decoder_args, normalize, random_crop, read_files


@do_not_convert
def _coin(prob: float):
    return fn.random.coin_flip(probability=prob, dtype=types.BOOL)


@do_not_convert
def _uniform(low: float, high: float):
    """A random draw in [low, high], or the constant when the range is empty (DALI rejects it)."""
    return fn.random.uniform(range=(low, high)) if high > low else low


def simclr_strong(images, cfg: Any):
    """torchvision's RandomApply(ColorJitter, p=jitter_prob), RandomGrayscale(p=gray_prob),
    Gaussian blur (p=blur_prob), then solarize (p=solarize_prob), as the torch backend does.

    The jitter draws its four factors and one of the 24 op orders per image (color.py, within
    2/255 of torchvision per op). Per-sample conditionals skip the work for samples that draw
    no jitter, grayscale, blur or solarize (the pipeline is defined with enable_conditionals=True).
    """
    if _coin(cfg.jitter_prob):
        images, _ = color.color_jitter(images, cfg.jitter, cfg.jitter, cfg.saturation, cfg.hue)
    if _coin(cfg.gray_prob):
        images = color.grayscale(images)
    if _coin(cfg.blur_prob):
        images = fn.gaussian_blur(
            images, sigma=_uniform(cfg.blur_sigma_min, cfg.blur_sigma_max))
    if cfg.solarize_prob > 0 and _coin(cfg.solarize_prob):
        images = color.solarize(images)
    return images


def randaugment_strong(images, cfg: Any):
    from nvidia.dali.auto_aug import rand_augment

    return rand_augment.rand_augment(images, n=cfg.randaug_n, m=cfg.randaug_m,
                                     shape=(cfg.crop_size, cfg.crop_size))


@pipeline_def(enable_conditionals=True, enable_checkpointing=True)
def unlabeled_pipeline(cfg: Any, file_root: str, files: list[str], indices: list[int],
                       device: str = "cpu", layout: str = "CHW", source: Callable | None = None):
    """Outputs (weak, strong_1..strong_k, index); every view has its own crop and flip, strong
    view i of cfg.strong_crops()[i]'s size and scale range (multi-crop)."""
    jpegs, index = read_files(file_root, files, indices, source=source)
    images = fn.decoders.image(jpegs, **decoder_args(cfg, device))
    outputs = [normalize(random_crop(images, cfg), cfg, layout,
                         mirror=fn.random.coin_flip(probability=0.5))]
    strong = randaugment_strong if cfg.strong == "randaugment" else simclr_strong
    for size, low, high in cfg.strong_crops():
        view = strong(random_crop(images, cfg, size, (low, high)), cfg)
        outputs.append(normalize(view, cfg, layout, mirror=fn.random.coin_flip(probability=0.5)))
    if device == "gpu":
        index = index.gpu()
    return (*outputs, index)
