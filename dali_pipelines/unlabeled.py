"""Unlabeled stream: one decode, a weak view and `num_strong` strong views per image."""
from __future__ import annotations

from typing import Any

from nvidia.dali import fn, pipeline_def, types

from dali_pipelines.common import decoder_args, normalize, random_crop, read_files


def _coin(prob: float):
    return fn.random.coin_flip(probability=prob, dtype=types.BOOL)


def _uniform(low: float, high: float):
    """A random draw in [low, high], or the constant when the range is empty (DALI rejects it)."""
    return fn.random.uniform(range=(low, high)) if high > low else low


def simclr_strong(images, cfg: Any):
    """Color jitter (p=jitter_prob), grayscale (p=gray_prob), Gaussian blur (p=blur_prob).

    Jitter and grayscale are one `color_twist` (grayscale = saturation 0, the same luma as
    torchvision's). Per-sample conditionals skip the work for samples that draw no jitter,
    grayscale or blur (the pipeline is defined with enable_conditionals=True).
    """
    j = cfg.jitter
    gray = _coin(cfg.gray_prob)
    if _coin(cfg.jitter_prob):
        factors = [_uniform(max(0.0, 1.0 - j), 1.0 + j) for _ in range(3)]
        hue = _uniform(-cfg.hue * 360.0, cfg.hue * 360.0)
        keep = 1.0 - fn.cast(gray, dtype=types.FLOAT)
        images = fn.color_twist(images, brightness=factors[0], contrast=factors[1],
                                saturation=factors[2] * keep, hue=hue)
    elif gray:
        images = fn.color_twist(images, saturation=0.0)
    if _coin(cfg.blur_prob):
        images = fn.gaussian_blur(
            images, sigma=_uniform(cfg.blur_sigma_min, cfg.blur_sigma_max))
    return images


def randaugment_strong(images, cfg: Any):
    from nvidia.dali.auto_aug import rand_augment

    return rand_augment.rand_augment(images, n=cfg.randaug_n, m=cfg.randaug_m,
                                     shape=(cfg.crop_size, cfg.crop_size))


@pipeline_def(enable_conditionals=True, enable_checkpointing=True)
def unlabeled_pipeline(cfg: Any, file_root: str, files: list[str], indices: list[int],
                       device: str = "cpu", layout: str = "CHW"):
    """Outputs (weak, strong_1..strong_k, index); every view has its own crop and flip."""
    jpegs, index = read_files(file_root, files, indices)
    images = fn.decoders.image(jpegs, **decoder_args(cfg, device))
    outputs = [normalize(random_crop(images, cfg), cfg, layout,
                         mirror=fn.random.coin_flip(probability=0.5))]
    strong = randaugment_strong if cfg.strong == "randaugment" else simclr_strong
    for _ in range(cfg.num_strong):
        view = strong(random_crop(images, cfg), cfg)
        outputs.append(normalize(view, cfg, layout, mirror=fn.random.coin_flip(probability=0.5)))
    if device == "gpu":
        index = index.gpu()
    return (*outputs, index)
