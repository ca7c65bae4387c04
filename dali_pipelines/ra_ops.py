"""FixMatch's RandAugment operations (USB's list and ranges) as DALI graph pieces with PIL's
semantics, for the strong views of dali_pipelines/small_augment.py. The ops are `@augmentation`s:
- from `nvidia.dali.auto_aug.augmentations`, called with the per-sample level (their `.op`)
  where the op is PIL's: identity, posterize (bitwise and), solarize, rotate, shear_x /
  shear_y and translate_x / translate_y (warp_affine / rotate with nearest sampling and black
  fill; PIL maps output to input, DALI's shear and translation are forward maps, hence the
  negated parameters);
- written here where DALI's differ from PIL's: brightness, color, contrast (PIL truncates the
  blend and takes the contrast mean from its integer luma, rounded to a level), sharpness (PIL
  rounds the smoothed image first and leaves the 1 px border as it is), auto_contrast (PIL
  truncates; computed in float64 as PIL does) and equalize (PIL's histogram step
  (N - count of the top level) // 255, not OpenCV's formula of `fn.experimental.equalize`;
  on the CPU a numpy function, as no DALI operator gathers from a per-sample table).
Measured against PIL on photos at 32 and 96 px (tests/data/test_table1_augment.py), every
op gives PIL's levels exactly, except rotate at 96 px, off at 0.12 % of the pixels (a sample
point on a pixel boundary: PIL steps through the rows in double precision, DALI computes each
point in float32).

Speed on the CPU: benchmarks/small_views.py (docs/PERFORMANCE.md).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import nvidia.dali.math as dmath
from nvidia.dali import fn, types
from nvidia.dali.auto_aug import augmentations as aa
from nvidia.dali.auto_aug.core import augmentation

from dali_pipelines.ra_list import OP_NAMES, RA_OPS

# PIL's "L" conversion: (19595 R + 38470 G + 7471 B + 0x8000) >> 16
LUMA16 = (19595, 38470, 7471)
SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13.0  # ImageFilter.SMOOTH
NEAREST = types.INTERP_NN


def on_device_of(images, node):
    """`node` (built on the CPU) where `images` are: GPU operators take GPU data inputs."""
    return node.gpu() if images.device == "gpu" else node


# ---- the ops in PIL's semantics: images and the op's level (a per-sample scalar) ----

def _levels(x):
    """Integer-valued floats -> uint8, saturated (PIL's clip of the blend)."""
    return fn.cast(x, dtype=types.UINT8)


def _blend(degenerate, images, factor):
    """PIL's Image.blend(degenerate, images, factor) on uint8: the float32 value
    d + factor * (x - d), truncated, clipped to [0, 255]. `degenerate` is int32 or float32
    (never uint8: x - d would wrap); DALI promotes the rest, no cast of the image is needed."""
    return _levels(dmath.floor(degenerate + factor * (images - degenerate)))


def luma(images):
    """PIL's "L" of RGB: integer luma, (H, W, 1) int32."""
    r, g, b = images[:, :, 0:1], images[:, :, 1:2], images[:, :, 2:3]
    return (r * LUMA16[0] + g * LUMA16[1] + b * LUMA16[2] + 32768) // 65536


def brightness(images, factor):
    """ImageEnhance.Brightness: a blend with black."""
    return _levels(dmath.floor(images * factor))


def color(images, factor):
    """ImageEnhance.Color: a blend with the image's own "L" grey."""
    return _blend(luma(images), images, factor)


def contrast(images, factor):
    """ImageEnhance.Contrast: a blend with the mean of "L", rounded to a level."""
    mean = fn.reductions.mean(luma(images), axes=[0, 1, 2], dtype=types.FLOAT)
    return _blend(dmath.floor(mean + 0.5), images, factor)


def sharpness(images, factor):
    """ImageEnhance.Sharpness: a blend with ImageFilter.SMOOTH, rounded to levels, on the
    inside; PIL leaves the 1 px border unfiltered, so the border stays the input's."""
    inner = images[1:-1, 1:-1]
    kernel = types.Constant(SMOOTH, device=images.device)
    smooth = fn.filter(images, kernel, mode="valid", dtype=types.FLOAT)
    inner = _blend(dmath.floor(smooth + 0.5), inner, factor)
    middle = fn.cat(images[1:-1, 0:1], inner, images[1:-1, -1:], axis=1)
    return fn.cat(images[0:1], middle, images[-1:], axis=0)


def auto_contrast(images):
    """ImageOps.autocontrast: per channel, int(x * 255 / (hi - lo) - lo * 255 / (hi - lo))
    in float64 (PIL's lookup table), clipped; a flat channel stays as it is."""
    lo = fn.cast(fn.reductions.min(images, axes=[0, 1], keep_dims=True), dtype=types.FLOAT64)
    hi = fn.cast(fn.reductions.max(images, axes=[0, 1], keep_dims=True), dtype=types.FLOAT64)
    spread = hi > lo
    scale = 255.0 / dmath.max(hi - lo, 1.0)  # float64: lo and hi are
    offset = (0.0 - lo) * scale
    stretched = dmath.clamp(dmath.floor(images * scale + offset), 0.0, 255.0)
    return _levels(images + spread * (stretched - images))


def equalize_array(x: np.ndarray) -> np.ndarray:
    """ImageOps.equalize of one uint8 HWC array, per channel: with N pixels, h the histogram
    and below[i] the count of levels < i, step = (N - h[top level]) // 255 and lut[i] =
    min(255, (step // 2 + below[i]) // step); step 0 (one level, or too few pixels) leaves
    the channel as it is."""
    out = np.array(x, copy=True)
    n = x.shape[0] * x.shape[1]
    for c in range(x.shape[2]):
        channel = x[:, :, c]
        hist = np.bincount(channel.ravel(), minlength=256)
        step = (n - int(hist[np.flatnonzero(hist)[-1]])) // 255
        if step:
            below = np.cumsum(hist) - hist
            out[:, :, c] = np.minimum((step // 2 + below) // step, 255).astype(np.uint8)[channel]
    return out


def equalize_ops(images):
    """`equalize_array` in DALI operators (any device). No DALI operator gathers from a
    per-sample table, so the histogram and the lookup are comparisons against the 256 levels,
    reduced: (H*W, 256, 3) bytes per image, twice; fine on a GPU, about 4 ms a 32 px image on
    a CPU core."""
    flat = fn.reshape(images, shape=[-1, 1, 3])
    levels = types.Constant(np.arange(256, dtype=np.uint8).reshape(1, 256, 1), device=images.device)
    one = types.Constant(1, dtype=types.UINT8, device=images.device)
    below = fn.cast(fn.reductions.sum((flat < levels) * one, axes=[0]), dtype=types.INT32)
    top = fn.reductions.max(images, axes=[0, 1], keep_dims=True)
    under_top = fn.reductions.sum((images < top) * one, axes=[0, 1])
    step = fn.cast(under_top, dtype=types.INT32) // 255
    lut = fn.cast(dmath.min((step // 2 + below) // dmath.max(step, 1), 255), dtype=types.UINT8)
    mapped = fn.reductions.max((flat == levels) * lut, axes=[1])  # (H*W, 3): lut[x]
    mapped = fn.reshape(mapped, shape=images.shape(dtype=types.INT32))
    keep = step == 0
    return _levels(images * keep + mapped * (1 - keep))


def equalize(images):
    """ImageOps.equalize: on the CPU `equalize_array` through fn.python_function (numpy's
    bincount and a table lookup: about 80 times faster than `equalize_ops` there; stateless, so
    checkpoints are unaffected); on the GPU `equalize_ops`."""
    if images.device == "gpu":
        return equalize_ops(images)
    return fn.python_function(images, function=equalize_array, output_layouts="HWC")


def posterize(images, bits):
    """ImageOps.posterize: keep the `bits` (int32, 1..8) high bits; auto_aug's bitwise and."""
    mask = fn.lookup_table(bits, keys=list(range(1, 9)),
                           values=[256 - (1 << (8 - b)) for b in range(1, 9)], dtype=types.UINT8)
    return aa.posterize.op(images, mask)


def solarize(images, threshold):
    """ImageOps.solarize: levels >= threshold inverted (auto_aug's solarize)."""
    return aa.solarize.op(images, threshold)


def rotate(images, degrees):
    """Image.rotate(degrees): counter-clockwise about the centre, nearest, black fill."""
    return aa.rotate.op(images, degrees, fill_value=0, interp_type=NEAREST)


def _along(v, axis: int):
    """The 2-vector with -v at `axis` (0: x, 1: y) and 0 at the other."""
    unit = np.zeros(2, dtype=np.float32)
    unit[axis] = -1.0
    return types.Constant(unit) * v


def shear_x(images, v):
    """transform(AFFINE, (1, v, 0, 0, 1, 0)): input x = x + v * y (DALI's forward map: -v)."""
    return aa.shear_x.op(images, _along(v, 0), fill_value=0, interp_type=NEAREST)


def shear_y(images, v):
    """transform(AFFINE, (1, 0, 0, v, 1, 0)): input y = y + v * x."""
    return aa.shear_y.op(images, _along(v, 1), fill_value=0, interp_type=NEAREST)


def translate_x(images, v):
    """transform(AFFINE, (1, 0, v * W, 0, 1, 0)): the content moves left by v * W px."""
    return aa.translate_x.op(images, _along(v, 0), images.shape(), fill_value=0,
                             interp_type=NEAREST)


def translate_y(images, v):
    """transform(AFFINE, (1, 0, 0, 0, 1, v * H)): the content moves up by v * H px."""
    return aa.translate_y.op(images, _along(v, 1), images.shape(), fill_value=0,
                             interp_type=NEAREST)


def identity(images):
    return aa.identity.op(images, None)


def _with_level(fun: Callable, low: float, high: float) -> Callable:
    return lambda images, level: fun(images, level * (high - low) + low)


def _no_level(fun: Callable) -> Callable:
    def op(images, _level):
        return fun(images)

    return op


# Each op as a function of (images, level in PIL's units; ignored by the ops without one).
PIL_OPS: dict[str, Callable] = {
    "auto_contrast": _no_level(auto_contrast), "brightness": brightness, "color": color,
    "contrast": contrast, "equalize": _no_level(equalize), "identity": _no_level(identity),
    "posterize": posterize, "rotate": rotate, "sharpness": sharpness, "shear_x": shear_x,
    "shear_y": shear_y, "solarize": solarize, "translate_x": translate_x, "translate_y": translate_y,
}


def _posterize_level(images, u):
    """int(4 + 4u) bits, 4..7, as USB's int(v) (the min: float32 rounds 4 + 4u up to 8 for the
    largest u below 1)."""
    low, high = RA_OPS[OP_NAMES.index("posterize")][1:]
    bits = dmath.min(dmath.floor(u * (high - low) + low), high - 1.0)
    return posterize(images, fn.cast(bits, dtype=types.INT32))


def _ra_augmentation(name: str, low: float, high: float):
    """The op as an auto_aug `@augmentation` taking `level` (u ~ U[0, 1)) as a keyword."""
    if name in ("auto_contrast", "equalize", "identity"):
        fun = PIL_OPS[name]

        def op(data, _param, level):
            return fun(data, None)
    elif name == "posterize":
        def op(data, _param, level):
            return _posterize_level(data, level)
    else:
        fun = _with_level(PIL_OPS[name], low, high)

        def op(data, _param, level):
            return fun(data, level)
    op.__name__ = name
    return augmentation(op)


RA_AUGMENTATIONS = tuple(_ra_augmentation(*spec) for spec in RA_OPS)
