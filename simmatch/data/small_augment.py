"""The augmentations of the CIFAR-10/100, SVHN and STL-10 recipes (SimMatch's Table 1), torch
backend; dali_pipelines/small_augment.py is the DALI twin, held to these by
tests/data/test_table1_augment.py.

Weak view: a horizontal flip with p 0.5 (off for SVHN), then a random translation of up to
12.5 % of the side: reflect-pad by `pad_for(side)` px (4 at 32 px, 12 at 96 px) and crop the
original size at an offset drawn uniformly in 0..2*pad per axis. The draws are those of
torchvision's `RandomHorizontalFlip()` then `RandomCrop(side, padding=pad,
padding_mode="reflect")` (`torch.rand(1) < 0.5`, then `torch.randint(0, 2*pad + 1, (1,))`
for the top and then the left offset), so under one seed the view is theirs, pixel for pixel.

Strong view: its own flip and pad-crop (drawn like the weak view's, independently), then
FixMatch's RandAugment: `n` ops drawn uniformly with replacement from the 14 of `RA_OPS`, each
with a level drawn uniformly in its range, then Cutout. The list, the ranges and the op
semantics are those of USB's FixMatch RandAugment (semilearn/datasets/augmentation/
randaugment.py): PIL.ImageOps / ImageEnhance, `img.rotate(v)` and `img.transform(AFFINE)`
with their default nearest resampling and black fill. Cutout paints a square of side
v * width, v ~ U[0, 0.5], filled with (125, 123, 114); as USB draws it, the box starts at
x0 = int(max(0, cx - side/2)) (a box past the left or top edge is moved inside, not cut) and
PIL's `rectangle` fills columns x0 .. x0 + int(side) inclusive, cut at the right and bottom
edges: int(side) + 1 px wide unless the edge cuts it.

Where this differs from the FixMatch code it follows:
- USB draws the Cutout centre with `np.random.uniform(w)`, that is uniform on [1, w] (numpy's
  `low` is w, `high` defaults to 1.0); here it is uniform on [0, w), as in kekmodel's
  FixMatch-pytorch and as the paper describes.
- USB's own CIFAR/STL-10 strong transform is RandAugment(3, 5): n = 3 ops; FixMatch's paper
  and code use n = 2, the default here (`n` sets it).
- kekmodel/FixMatch-pytorch's RandAugmentMC (the other common PyTorch port) differs from
  USB's: it applies each drawn op only with probability 0.5; its level is an integer
  1..m-1 (m = 10) scaled into [0, max] (not a continuous uniform draw); the geometric ops and
  solarize take a random sign / 256 - v; Posterize keeps 4 + int(v * 4 / 10) bits;
  translations are rounded to whole pixels; and its Cutout is always 16 px (at 32 px: 0.5 of
  the side), grey (127, 127, 127). Neither port's weak view differs from the one here.

Randomness comes from torch's global RNG only (`torch.rand`, `torch.randint`): the caller
seeds it per sample (`torch.manual_seed(sample_seed)` inside `torch.random.fork_rng`), which
is what makes a resumed run draw the same views. Input: a PIL RGB image or a uint8 HWC RGB
array; output: a PIL RGB image (uint8 HWC); the caller converts and normalises.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from dali_pipelines.ra_list import CUTOUT_FILL, CUTOUT_MAX, RA_OPS


def as_array(img: Any) -> np.ndarray:
    """uint8 HWC RGB array of a PIL image or an array."""
    arr = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected a uint8 HWC RGB image, got {arr.dtype} {arr.shape}")
    return arr


# ---- the ops, in PIL's semantics (image in, image out; `v` is the op's level) ----

def auto_contrast(img: Image.Image, _v: float = 0.0) -> Image.Image:
    return ImageOps.autocontrast(img)


def brightness(img: Image.Image, v: float) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(v)


def color(img: Image.Image, v: float) -> Image.Image:
    return ImageEnhance.Color(img).enhance(v)


def contrast(img: Image.Image, v: float) -> Image.Image:
    return ImageEnhance.Contrast(img).enhance(v)


def equalize(img: Image.Image, _v: float = 0.0) -> Image.Image:
    return ImageOps.equalize(img)


def identity(img: Image.Image, _v: float = 0.0) -> Image.Image:
    return img


def posterize(img: Image.Image, v: float) -> Image.Image:
    """Keep the int(v) high bits of every level."""
    return ImageOps.posterize(img, max(1, int(v)))


def rotate(img: Image.Image, v: float) -> Image.Image:
    """v degrees counter-clockwise about the centre."""
    return img.rotate(v)


def sharpness(img: Image.Image, v: float) -> Image.Image:
    return ImageEnhance.Sharpness(img).enhance(v)


def _affine(img: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    """Output pixel (x, y) takes the input at matrix . (x + 0.5, y + 0.5, 1), nearest; black
    outside."""
    return img.transform(img.size, Image.AFFINE, matrix)


def shear_x(img: Image.Image, v: float) -> Image.Image:
    return _affine(img, (1, v, 0, 0, 1, 0))


def shear_y(img: Image.Image, v: float) -> Image.Image:
    return _affine(img, (1, 0, 0, v, 1, 0))


def solarize(img: Image.Image, v: float) -> Image.Image:
    """Invert every level >= v."""
    return ImageOps.solarize(img, v)


def translate_x(img: Image.Image, v: float) -> Image.Image:
    """Shift the content left by v * width px (right for v < 0)."""
    return _affine(img, (1, 0, v * img.size[0], 0, 1, 0))


def translate_y(img: Image.Image, v: float) -> Image.Image:
    return _affine(img, (1, 0, 0, 0, 1, v * img.size[1]))


OPS: dict[str, Callable[[Image.Image, float], Image.Image]] = {
    "auto_contrast": auto_contrast, "brightness": brightness, "color": color,
    "contrast": contrast, "equalize": equalize, "identity": identity, "posterize": posterize,
    "rotate": rotate, "sharpness": sharpness, "shear_x": shear_x, "shear_y": shear_y,
    "solarize": solarize, "translate_x": translate_x, "translate_y": translate_y,
}


def cutout_box(width: int, height: int, v: float, cx: float, cy: float) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), inclusive pixel bounds of the Cutout square of side v * width centred
    near (cx, cy); None for v <= 0 (no Cutout), as USB."""
    side = v * width
    if side <= 0:
        return None
    x0 = int(max(0.0, cx - side / 2.0))
    y0 = int(max(0.0, cy - side / 2.0))
    return x0, y0, min(width - 1, int(x0 + side)), min(height - 1, int(y0 + side))


def cutout(img: Image.Image, v: float, cx: float, cy: float) -> Image.Image:
    """Paint the Cutout square (`cutout_box`) with CUTOUT_FILL."""
    box = cutout_box(img.size[0], img.size[1], v, cx, cy)
    if box is None:
        return img
    img = img.copy()
    ImageDraw.Draw(img).rectangle(box, fill=CUTOUT_FILL)
    return img


# ---- the random parts ----

def flip_crop(img: Any, pad: int, flip: bool = True) -> np.ndarray:
    """The weak view as an array: flip (p 0.5, when `flip`), then the reflect pad-crop;
    torchvision's RandomHorizontalFlip + RandomCrop(padding=pad, padding_mode="reflect")
    draws and results."""
    arr = as_array(img)
    if flip and torch.rand(1) < 0.5:
        arr = arr[:, ::-1]
    if pad > 0:
        h, w = arr.shape[:2]
        top = int(torch.randint(0, 2 * pad + 1, size=(1,)))
        left = int(torch.randint(0, 2 * pad + 1, size=(1,)))
        arr = np.pad(arr, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")[top:top + h, left:left + w]
    return np.ascontiguousarray(arr)


def draw_ops(n: int) -> list[tuple[str, float]]:
    """n (op name, level) pairs: ops uniform with replacement, levels uniform in their range."""
    ops = torch.randint(0, len(RA_OPS), size=(n,)).tolist()
    levels = torch.rand(n).tolist()
    return [(RA_OPS[k][0], RA_OPS[k][1] + (RA_OPS[k][2] - RA_OPS[k][1]) * u) for k, u in zip(ops, levels)]


def draw_cutout(width: int, height: int) -> tuple[float, float, float]:
    """(v, cx, cy): the side fraction v ~ U[0, CUTOUT_MAX], the centre uniform over the image."""
    v, x, y = torch.rand(3).tolist()
    return v * CUTOUT_MAX, x * width, y * height


def rand_augment(img: Image.Image, ops: Sequence[tuple[str, float]],
                 box: tuple[float, float, float] | None) -> Image.Image:
    """Apply the drawn ops in order, then the drawn Cutout (None: none)."""
    for name, v in ops:
        img = OPS[name](img, v)
    return img if box is None else cutout(img, *box)


def weak(img: Any, pad: int, flip: bool = True) -> Image.Image:
    """The weak view: `flip_crop`, as a PIL image."""
    return Image.fromarray(flip_crop(img, pad, flip))


def strong(img: Any, pad: int, flip: bool = True, n: int = 2, use_cutout: bool = True) -> Image.Image:
    """flip_crop, n RandAugment ops, Cutout. Draw order: flip, top, left, the n op indices,
    the n levels, then (v, cx, cy) of the Cutout."""
    arr = flip_crop(img, pad, flip)
    ops = draw_ops(n)
    box = draw_cutout(arr.shape[1], arr.shape[0]) if use_cutout else None
    return rand_augment(Image.fromarray(arr), ops, box)


class WeakView:
    """`weak` as a picklable transform (DataLoader workers)."""

    def __init__(self, pad: int, flip: bool = True) -> None:
        self.pad, self.flip = pad, flip

    def __call__(self, img: Any) -> Image.Image:
        return weak(img, self.pad, self.flip)


class StrongView:
    """`strong` as a picklable transform (DataLoader workers)."""

    def __init__(self, pad: int, flip: bool = True, n: int = 2, use_cutout: bool = True) -> None:
        self.pad, self.flip, self.n, self.use_cutout = pad, flip, n, use_cutout

    def __call__(self, img: Any) -> Image.Image:
        return strong(img, self.pad, self.flip, self.n, self.use_cutout)
