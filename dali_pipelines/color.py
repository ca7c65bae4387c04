"""torchvision's ColorJitter and Grayscale as DALI graph pieces (CPU and GPU alike).

DALI's own colour operators alone differ from torchvision's: `color_twist` / `hsv` rotate hue
in YIQ (torchvision: HSV), contrast pivots on a fixed centre (torchvision: the image's mean
grey level), and one fused call applies the four adjustments in a fixed order (torchvision:
`randperm(4)` per image). Each adjustment here follows torchvision.transforms.v2.functional
(`adjust_brightness`, `adjust_contrast`, `adjust_saturation`, `adjust_hue`,
`rgb_to_grayscale`): DALI operators where one computes the same formula (brightness,
saturation, grayscale), elementwise arithmetic where none does (contrast about the mean grey,
HSV hue). Every op takes and gives uint8 HWC, rounding and saturating to [0, 255] after each
op as torchvision does on uint8 images and PIL does; measured against torchvision's float
ops on real photos the mean absolute difference stays under 1/255 per op
(tests/data/test_color_parity.py holds it to 2/255).

That is 60-odd DALI operators per jittered image, which DALI's CPU executor runs one after the
other; the CPU graphs run the same arithmetic as one compiled operator instead
(`fused_jitter`, jitter_kernel.py), the GPU graphs as these operators (batched GPU kernels).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import nvidia.dali.math as dmath
from nvidia.dali import fn, types
from nvidia.dali.pipeline import do_not_convert

# ITU-R 601-2 luma, torchvision's rgb_to_grayscale weights (PIL uses 0.299, 0.587, 0.114).
LUMA = (0.2989, 0.587, 0.114)
# The op index of each slot for each of the 24 orders; ops: brightness, contrast, saturation, hue.
PERMUTATIONS: tuple[tuple[int, ...], ...] = tuple(itertools.permutations(range(4)))
OP_NAMES = ("brightness", "contrast", "saturation", "hue")


@do_not_convert
def to_uint8(x):
    """Round to the nearest level and saturate to [0, 255] (torchvision's clamp after each op)."""
    return fn.cast(x, dtype=types.UINT8)


@do_not_convert
def adjust_brightness(images, factor):
    """x * factor (a blend with black), saturated to [0, 255]."""
    return fn.brightness_contrast(images, brightness=factor)


@do_not_convert
def grey_mean(images):
    """The mean grey level of each image: the luma of its per-channel means (luma is linear)."""
    mean = fn.reductions.mean(images, axes=[0, 1], dtype=types.FLOAT)
    return mean[0] * LUMA[0] + mean[1] * LUMA[1] + mean[2] * LUMA[2]


@do_not_convert
def adjust_contrast(images, factor, arithmetic: bool | None = None):
    """Blend with the image's mean grey level: factor * x + (1 - factor) * mean, saturated.

    On the CPU one brightness_contrast call pivoting on the mean does it (10x faster than the
    arithmetic); on the GPU the mean is a GPU tensor and operator arguments must come from the
    CPU, so there (or with `arithmetic=True`, which lets the CPU tests check that path too)
    the blend is written as arithmetic.
    """
    if arithmetic is None:
        arithmetic = images.device == "gpu"
    if arithmetic:
        return to_uint8(images * factor + grey_mean(images) * (1.0 - factor))
    return fn.brightness_contrast(images, contrast=factor, contrast_center=grey_mean(images))


@do_not_convert
def adjust_saturation(images, factor):
    """Blend with the image's own grey version, saturated.

    DALI's saturation scales I and Q of YIQ and keeps Y = 0.299 R + 0.587 G + 0.114 B; since
    YIQ -> RGB adds Y to every channel, that is exactly factor * x + (1 - factor) * Y.
    """
    # Computed in float and rounded by one cast: the same levels as color_twist's own uint8 output
    # (tests/data/test_color_jitter_passes.py), whose per-element libm roundf made it 25% dearer.
    return to_uint8(fn.color_twist(images, saturation=factor, dtype=types.FLOAT))


@do_not_convert
def adjust_hue(images, factor):
    """Rotate the HSV hue by `factor` turns (in [-0.5, 0.5]); saturation and value are kept.

    The hue h in sextants (from the max channel, as torchvision's _rgb_to_hsv) is shifted and
    wrapped to [0, 6); with V = max, C = max - min, channel c = min + C * f_c(h) where
    f_R = clamp(|h - 3| - 1), f_G = clamp(2 - |h - 2|), f_B = clamp(2 - |h - 4|) (the closed
    form of HSV -> RGB). Grey pixels (C = 0) stay as they are.
    """
    x = fn.cast(images, dtype=types.FLOAT)
    r, g, b = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    vmax = dmath.max(dmath.max(r, g), b)
    vmin = dmath.min(dmath.min(r, g), b)
    chroma = vmax - vmin
    inv = 1.0 / dmath.max(chroma, 1.0)  # levels are integers: C is 0 or >= 1; grey: any hue
    # The sextant formula of the max channel (r before g before b, as torchvision; where two
    # channels tie for the max their formulas agree modulo 6). h in [-1, 5); + 12 keeps it
    # positive for the floor-based modulo below.
    h_gb = (r - g) * inv + 4.0
    h_gb = h_gb + (vmax == g) * ((b - r) * inv + 2.0 - h_gb)
    h = h_gb + (vmax == r) * ((g - b) * inv - h_gb) + (factor * 6.0 + 12.0)
    h = h - dmath.floor(h * (1.0 / 6.0)) * 6.0
    f_r = dmath.clamp(dmath.abs(h - 3.0) - 1.0, 0.0, 1.0)
    f_g = dmath.clamp(2.0 - dmath.abs(h - 2.0), 0.0, 1.0)
    f_b = dmath.clamp(2.0 - dmath.abs(h - 4.0), 0.0, 1.0)
    planes = [vmin + chroma * f for f in (f_r, f_g, f_b)]
    return to_uint8(fn.stack(*planes, axis=2, axis_name="C"))


@do_not_convert
def grayscale(images):
    """Three equal channels of the grey level (torchvision's RandomGrayscale output).

    DALI's RGB -> GRAY conversion (ITU-R 601-2 luma), copied to three channels; saturation 0
    through color_twist would leave the channels a level apart here and there.
    """
    grey = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY)
    return fn.cat(grey, grey, grey, axis=2)


@do_not_convert
def solarize(images, threshold: float = 128.0):
    """PIL's ImageOps.solarize: every level at or above `threshold` inverted (255 - x), exactly."""
    x = fn.cast(images, dtype=types.FLOAT)
    return to_uint8(x + (x >= threshold) * (255.0 - 2.0 * x))


ADJUST: tuple[Callable, ...] = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


@do_not_convert
def _uniform(low: float, high: float):
    """A random draw in [low, high], or None when the range is empty (the op is the identity)."""
    return fn.random.uniform(range=(low, high)) if high > low else None


@do_not_convert
def draw_factors(brightness: float, contrast: float, saturation: float, hue: float) -> list:
    """Per-image factors of torchvision's ColorJitter(brightness, contrast, saturation, hue):
    U[max(0, 1 - s), 1 + s] for the first three, U[-hue, hue] for hue; None where the range is
    empty (a disabled op)."""
    return [*(_uniform(max(0.0, 1.0 - s), 1.0 + s) for s in (brightness, contrast, saturation)),
            _uniform(-hue, hue)]


SKIP = len(OP_NAMES)  # the code of "no op in this pass"
HUE = OP_NAMES.index("hue")


@do_not_convert
def pass_codes(slot: int, before_hue: bool) -> list[int]:
    """For each of the 24 orders: the op at `slot` if it runs before (or after) the hue, else SKIP."""
    codes = []
    for order in PERMUTATIONS:
        runs = slot < order.index(HUE) if before_hue else slot > order.index(HUE)
        codes.append(order[slot] if runs else SKIP)
    return codes


@do_not_convert
def _pass_code(order, slot: int, before_hue: bool):
    """Each image's code for this pass (`pass_codes`), looked up from its drawn order."""
    return fn.lookup_table(order, keys=list(range(len(PERMUTATIONS))), values=pass_codes(slot, before_hue),
                           dtype=types.INT32)


def _apply(code, x, steps: list[Callable]):
    """x after brightness, contrast or saturation (code 0, 1, 2; SKIP: as it is); each branch runs
    on its samples only."""
    if code == 0:
        x = steps[0](x)
    elif code == 1:
        x = steps[1](x)
    elif code == 2:
        x = steps[2](x)
    return x


def _step(adjust: Callable, factor) -> Callable:
    if factor is None:
        return lambda x: x
    return lambda x: adjust(x, factor)


@do_not_convert
def saturation_matrix(factor):
    """color_twist(saturation=factor)'s matrix as DALI builds it, per image: the operator's float
    output for three unit pixels (1, 0, 0), (0, 1, 0), (0, 0, 1) is its three columns, exactly."""
    unit = fn.constant(idata=[1, 0, 0, 0, 1, 0, 0, 0, 1], shape=[1, 3, 3], dtype=types.UINT8, layout="HWC")
    return fn.color_twist(unit, saturation=factor, dtype=types.FLOAT)


@do_not_convert
def fused_jitter(images, factors: list, order):
    """The jitter of `color_jitter` in one CPU operator (jitter_kernel.py): the same draws and,
    image by image, the same levels as the operator graph."""
    # The order first: DALI seeds its random operators in the order a depth-first walk from the
    # outputs meets them, and the operator graph meets the order before the factors.
    order_f = fn.cast(order, dtype=types.FLOAT)
    nan = order_f * 0.0 + float("nan")  # a disabled op: skipped
    params = fn.stack(order_f, *[nan if f is None else f for f in factors])
    matrix = saturation_matrix(order_f * 0.0 + 1.0 if factors[2] is None else factors[2])
    try:
        from dali_pipelines.jitter_op import jitter_operator
    except ImportError as exc:  # the dali extras install numba
        raise ImportError(f"DALI's CPU colour jitter needs numba: pip install '.[dali]' ({exc})") from None
    return fn.reshape(jitter_operator()(images, params, matrix), layout="HWC")  # names the layout only


def color_jitter(images, brightness: float, contrast: float, saturation: float,
                 hue: float, fused: bool | None = None) -> tuple[Any, dict[str, Any]]:
    """torchvision's ColorJitter on uint8 HWC images: the four factors and one of the 24
    orders drawn per image. Returns the jittered uint8 images and the draws (for tests):
    {"order": index into PERMUTATIONS, "brightness": ..., "hue": ...}; an empty range is None.

    Every image gets its ops in its drawn order, each rounded and saturated as torchvision's.
    On the CPU (or with `fused=True`) one compiled operator does it (`fused_jitter`); on the GPU
    (or with `fused=False`) the graph of DALI operators below, whose levels that operator
    reproduces bit for bit. In that graph the hue rotation (about 50 elementwise operators) runs
    once, on every image: the ops drawn before it run first, in three passes of one op per
    image (slots 0-2, SKIP where the slot holds the hue or comes after it), those drawn after it
    in three more passes (slots 1-3).
    Branching each of the four slots four ways instead would run the hue's operators four
    times on a quarter of the images each: 4x the operator launches, on sub-batches too small
    to keep the thread pool busy (docs/PERFORMANCE.md, "Loader: where the second core went").

    Needs a pipeline defined with enable_conditionals=True (each pass branches per sample).
    """
    factors = draw_factors(brightness, contrast, saturation, hue)
    order = fn.random.uniform(values=list(range(len(PERMUTATIONS))), dtype=types.INT32)
    draws = {"order": order, **dict(zip(OP_NAMES, factors))}
    use_kernel = images.device == "cpu" if fused is None else fused
    if use_kernel:
        return fused_jitter(images, factors, order), draws
    steps = [_step(adjust, f) for adjust, f in zip(ADJUST, factors)]
    x = images
    for slot in range(0, 3):
        x = _apply(_pass_code(order, slot, True), x, steps)
    x = steps[HUE](x)
    for slot in range(1, 4):
        x = _apply(_pass_code(order, slot, False), x, steps)
    return x, draws
