"""The augmentations of the CIFAR-10/100, SVHN and STL-10 recipes (SimMatch's Table 1) as DALI
graph pieces: the twin of simmatch/data/small_augment.py (the torch backend, PIL's ops, whose
docstring gives the recipe), held to it by tests/data/test_table1_augment.py.

Contract: `weak` and `strong` take a batch of uint8 HWC RGB images (the raw 32 x 32 or
96 x 96 arrays, not padded: the reflect padding happens here) and give uint8 HWC views of the
same size; the caller normalises. They must be called inside a pipeline defined with
`enable_conditionals=True` (the strong view branches per sample on its drawn ops); every
random draw is a DALI random operator (`fn.random.uniform` / `coin_flip`), so a pipeline
defined with `enable_checkpointing=True` restores them from `pipe.checkpoint()`.

Weak view: `fn.flip` on a coin, then the reflect pad-crop as a shift: the crop at offset
(top, left) of the image reflect-padded by `pad` is the image moved by (top - pad, left - pad)
with reflected borders, which `fn.filter` computes exactly (border "reflect_101" is numpy's
and torchvision's "reflect": dcb|abcd) with a one-hot kernel per sample, one 1-D pass per
axis. DALI's own padding (`fn.pad`, `fn.slice`'s out_of_bounds_policy) has no reflect mode.

Strong view: its own flip and pad-crop, then `n` slots of RandAugment; in each, an op index
uniform in 0..13 and a level u ~ U[0, 1) (mapped into the op's range: USB's low +
(high - low) * u) drawn per sample, and `nvidia.dali.auto_aug.core.select` routes every sample
to its op (DALI's stock `rand_augment` uses one magnitude bin for every sample: not this).
Then Cutout with fn.erase. The ops themselves: dali_pipelines/ra_ops.py.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import nvidia.dali.math as dmath
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.auto_aug.core import select
from nvidia.dali.pipeline import do_not_convert

from dali_pipelines.ra_list import CUTOUT_FILL, CUTOUT_MAX, RA_OPS
from dali_pipelines.ra_ops import RA_AUGMENTATIONS, on_device_of


@do_not_convert
def _record(record: dict | None, key: str, value: Any) -> None:
    if record is not None:
        record.setdefault(key, []).append(value)


# ---- weak view ----

@do_not_convert
def hflip(images, coin):
    """Mirror the samples whose `coin` is 1."""
    return fn.flip(images, horizontal=coin, vertical=0)


@do_not_convert
def shift_reflect(images, top, left, pad: int):
    """The crop at (top, left) of `images` reflect-padded by `pad` (offsets in 0..2*pad): a
    correlation with a one-hot column, then a one-hot row, border reflect_101. Exact: every
    output is 1.0 times one input level."""
    taps = np.arange(2 * pad + 1, dtype=np.int32)
    rows = on_device_of(images, fn.cast(types.Constant(taps.reshape(-1, 1)) == top, dtype=types.FLOAT))
    cols = on_device_of(images, fn.cast(types.Constant(taps.reshape(1, -1)) == left, dtype=types.FLOAT))
    images = fn.filter(images, rows, border="reflect_101")
    return fn.filter(images, cols, border="reflect_101")


@do_not_convert
def flip_crop(images, pad: int, flip: bool = True, record: dict | None = None):
    """Flip with p 0.5 (when `flip`), then the reflect pad-crop with offsets uniform in
    0..2*pad (torchvision's RandomHorizontalFlip + RandomCrop(padding=pad, "reflect"))."""
    if flip:
        coin = fn.random.coin_flip(probability=0.5, dtype=types.INT32)
        _record(record, "flip", coin)
        images = hflip(images, coin)
    if pad > 0:
        offsets = list(range(2 * pad + 1))
        top = fn.random.uniform(values=offsets, dtype=types.INT32)
        left = fn.random.uniform(values=offsets, dtype=types.INT32)
        _record(record, "top", top)
        _record(record, "left", left)
        images = shift_reflect(images, top, left, pad)
    return images


@do_not_convert
def weak(images, pad: int, flip: bool = True, record: dict | None = None):
    """The weak view: `flip_crop`. `record`, a dict, receives the draws as lists of DataNodes
    ("flip", "top", "left"), for tests."""
    return flip_crop(images, pad, flip, record)


# ---- strong view ----

@do_not_convert
def cutout(images, v, cx, cy):
    """USB's Cutout (see simmatch/data/small_augment.py's `cutout_box`): a square of side
    v * W from x0 = int(max(0, cx - side/2)), int(side) + 1 px wide, cut at the right and
    bottom edges, filled with CUTOUT_FILL; v <= 0: none. `v`, `cx`, `cy` are float32."""
    shape = fn.cast(images.shape(), dtype=types.FLOAT)
    height, width = shape[0], shape[1]
    side = v * width
    x0 = dmath.floor(dmath.max(cx - side / 2.0, 0.0))
    y0 = dmath.floor(dmath.max(cy - side / 2.0, 0.0))
    extent = (dmath.floor(side) + 1.0) * (side > 0.0)
    w = dmath.min(extent, width - x0)
    h = dmath.min(extent, height - y0)
    return fn.erase(images, anchor=fn.stack(y0, x0), shape=fn.stack(h, w), axis_names="HW",
                    fill_value=list(CUTOUT_FILL))


def rand_augment(images, n: int, record: dict | None = None):
    """n slots, each an op index and a level drawn per sample, applied through auto_aug's
    `select` (per-sample conditionals)."""
    for _ in range(n):
        op = fn.random.uniform(values=list(range(len(RA_OPS))), dtype=types.INT32)
        level = fn.random.uniform(range=(0.0, 1.0))
        _record(record, "op", op)
        _record(record, "level", level)
        images = select(list(RA_AUGMENTATIONS), op, images, level=level)
    return images


def strong(images, pad: int, flip: bool = True, n: int = 2, use_cutout: bool = True,
           record: dict | None = None):
    """The strong view: `flip_crop` (its own draws), `rand_augment` with n ops, Cutout with
    v ~ U[0, 0.5] and a centre uniform over the image. `record` receives the draws ("flip",
    "top", "left", "op", "level", "cutout": [v, cx, cy])."""
    images = flip_crop(images, pad, flip, record)
    images = rand_augment(images, n, record)
    if use_cutout:
        shape = fn.cast(images.shape(), dtype=types.FLOAT)
        v = fn.random.uniform(range=(0.0, CUTOUT_MAX))
        cx = fn.random.uniform(range=(0.0, 1.0)) * shape[1]
        cy = fn.random.uniform(range=(0.0, 1.0)) * shape[0]
        _record(record, "cutout", fn.stack(v, cx, cy))
        images = cutout(images, v, cx, cy)
    return images


@pipeline_def(enable_conditionals=True, enable_checkpointing=True)
def small_views_pipeline(source: Callable, n_strong: int = 1, pad: int = 4, flip: bool = True,
                         n_ops: int = 2, use_cutout: bool = True, draws: bool = False):
    """(weak, strong_1..strong_k) of the uint8 HWC batches that `source` gives (a callable of
    DALI's BatchInfo returning a list of arrays: the iteration it is asked for is in the
    checkpoint); with `draws`, then the recorded draws, named by `draw_names(...)`."""
    images = fn.external_source(source=source, batch=True, batch_info=True, layout="HWC",
                                dtype=types.UINT8)
    record: dict | None = {} if draws else None
    outputs = [weak(images, pad, flip, record)]
    recorded = _flush(record)
    for _ in range(n_strong):
        outputs.append(strong(images, pad, flip, n_ops, use_cutout, record))
        recorded += _flush(record)
    return (*outputs, *recorded)


def _flush(record: dict | None) -> list:
    if record is None:
        return []
    nodes = [v for key in ("flip", "top", "left", "op", "level", "cutout") for v in record.get(key, [])]
    record.clear()
    return nodes


def draw_names(n_strong: int = 1, pad: int = 4, flip: bool = True, n_ops: int = 2,
               use_cutout: bool = True) -> list[str]:
    """Names of the draw outputs of small_views_pipeline(..., draws=True), e.g. "weak.top",
    "strong0.op1"."""
    def view(prefix: str, strong_view: bool) -> list[str]:
        names = [f"{prefix}.flip"] if flip else []
        names += [f"{prefix}.top", f"{prefix}.left"] if pad > 0 else []
        if strong_view:
            names += [f"{prefix}.op{i}" for i in range(n_ops)]
            names += [f"{prefix}.level{i}" for i in range(n_ops)]
            names += [f"{prefix}.cutout"] if use_cutout else []
        return names

    return view("weak", False) + [n for k in range(n_strong) for n in view(f"strong{k}", True)]
