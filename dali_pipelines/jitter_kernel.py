"""torchvision's ColorJitter as one compiled per-image kernel, for DALI's CPU graph.

The operator graph of color.py computes the jitter as 60-odd DALI operators per image (the HSV
hue rotation alone is 50 elementwise ones). DALI runs CPU operators one after the other, each
spread over the thread pool and awaited, and each writes its whole batch to memory before the
next reads it back: on the CPU the chain costs about 4 ms per jittered 224 px image and keeps
the second core waiting (docs/PERFORMANCE.md, "Loader: the colour jitter as one operator"). This
kernel runs the four adjustments of one image in its drawn order in one pass per adjustment
over three float planes, with the same float operations in the same order as the operator
graph, so it gives every image the same levels, bit for bit (tests/data/test_jitter_kernel.py).
It runs as one DALI operator (DALI's numba plugin), one image per thread-pool task.

Every level stays an integer held in float32 between adjustments: each adjustment rounds half
away from zero and saturates to [0, 255], as DALI's uint8 conversions (and torchvision's uint8
ops) do. A disabled adjustment (an empty factor range) is NaN in `params` and is skipped.
"""
from __future__ import annotations

import itertools

import numpy as np
from numba import carray, cfunc, extending, njit
from numba import types as nt
from numba.core import cgutils

F32 = np.float32
ZERO, ONE, HALF, TOP = F32(0.0), F32(1.0), F32(0.5), F32(255.0)
# ITU-R 601-2 luma (color.LUMA), as float32 constants: the operator graph multiplies by them so.
LUMA_R, LUMA_G, LUMA_B = F32(0.2989), F32(0.587), F32(0.114)
# For each of the 24 orders (color.PERMUTATIONS), the op at each slot: brightness 0, contrast 1,
# saturation 2, hue 3.
ORDERS = np.array(list(itertools.permutations(range(4))), dtype=np.int32)


@njit(inline="always", cache=True)
def level(v):
    """Saturate to [0, 255] and round half away from zero: DALI's float -> uint8 conversion."""
    v = min(max(v, ZERO), TOP)
    r = np.floor(v)
    return r + (ONE if v - r >= HALF else ZERO)


@njit(cache=True)
def brightness(r, g, b, factor):
    """DALI's brightness_contrast(brightness=f) on uint8: x * f, its multiplier formed as that
    operator forms it (f * 255 / 255); its addend is 0 here."""
    mul = (factor * TOP) / TOP
    for plane in (r, g, b):
        for i in range(plane.size):
            plane[i] = level(plane[i] * mul)


@njit(cache=True)
def contrast(r, g, b, factor):
    """brightness_contrast(contrast=f, contrast_center=the image's mean grey) on uint8.

    The channel means are sums of integer levels (exact in float64) divided in float32, as DALI's
    mean reduction gives them (compared up to 400 x 560 px, sums past float32's 2^24); the grey
    is their luma, summed in color.grey_mean's order."""
    n = F32(r.size)
    s_r = s_g = s_b = 0.0
    for i in range(r.size):
        s_r += r[i]
        s_g += g[i]
        s_b += b[i]
    centre = (F32(s_r) / n * LUMA_R + F32(s_g) / n * LUMA_G) + F32(s_b) / n * LUMA_B
    add = centre - factor * centre
    for plane in (r, g, b):
        for i in range(plane.size):
            plane[i] = level(plane[i] * factor + add)


@njit(cache=True)
def saturation(r, g, b, m):
    """color_twist(saturation=f)'s 3 x 3 matrix applied per pixel; `m` holds that matrix as DALI
    built it (its columns are color_twist's output for the three unit pixels: color.py)."""
    m00, m01, m02 = m[0, 0, 0], m[0, 1, 0], m[0, 2, 0]
    m10, m11, m12 = m[0, 0, 1], m[0, 1, 1], m[0, 2, 1]
    m20, m21, m22 = m[0, 0, 2], m[0, 1, 2], m[0, 2, 2]
    for i in range(r.size):
        x, y, z = r[i], g[i], b[i]
        r[i] = level(m00 * x + m01 * y + m02 * z)
        g[i] = level(m10 * x + m11 * y + m12 * z)
        b[i] = level(m20 * x + m21 * y + m22 * z)


@njit(cache=True)
def hue(r, g, b, factor):
    """color.adjust_hue's HSV rotation, the same float operations in the same order (its
    branch-free selects become selects here too)."""
    shift = factor * F32(6.0) + F32(12.0)
    sixth = F32(1.0 / 6.0)
    for i in range(r.size):
        x, y, z = r[i], g[i], b[i]
        vmax = max(max(x, y), z)
        vmin = min(min(x, y), z)
        chroma = vmax - vmin
        inv = ONE / max(chroma, ONE)
        h_gb = (x - y) * inv + F32(4.0)
        from_g = h_gb + (((z - x) * inv + F32(2.0)) - h_gb)
        h_gb = from_g if vmax == y else h_gb
        from_r = h_gb + ((y - z) * inv - h_gb)
        h = (from_r if vmax == x else h_gb) + shift
        h = h - np.floor(h * sixth) * F32(6.0)
        f_r = min(max(abs(h - F32(3.0)) - ONE, ZERO), ONE)
        f_g = min(max(F32(2.0) - abs(h - F32(2.0)), ZERO), ONE)
        f_b = min(max(F32(2.0) - abs(h - F32(4.0)), ZERO), ONE)
        r[i] = level(vmin + chroma * f_r)
        g[i] = level(vmin + chroma * f_g)
        b[i] = level(vmin + chroma * f_b)


@njit(cache=True)
def jitter_image(out, image, params, sat_matrix):
    """out (uint8 HWC) = `image` jittered. `params` (float32): the order's index, then the
    brightness, contrast, saturation and hue factors; the adjustments run in the order
    ORDERS[params[0]], each with its factor params[1 + op] (NaN: skipped)."""
    src = image.reshape(-1)
    n = src.size // 3
    r = np.empty(n, np.float32)
    g = np.empty(n, np.float32)
    b = np.empty(n, np.float32)
    for i in range(n):
        r[i] = src[3 * i]
        g[i] = src[3 * i + 1]
        b[i] = src[3 * i + 2]
    order = int(params[0])
    for slot in range(4):
        op = ORDERS[order, slot]
        factor = params[1 + op]
        if factor != factor:
            continue
        if op == 0:
            brightness(r, g, b, factor)
        elif op == 1:
            contrast(r, g, b, factor)
        elif op == 2:
            saturation(r, g, b, sat_matrix)
        else:
            hue(r, g, b, factor)
    dst = out.reshape(-1)
    for i in range(n):
        dst[3 * i] = np.uint8(r[i])
        dst[3 * i + 1] = np.uint8(g[i])
        dst[3 * i + 2] = np.uint8(b[i])


# DALI's NumbaFunction operator calls these two entry points (jitter_op.py). They live in this file
# because numba's cache on disk is invalidated by a change of the file a cached function is in,
# not of the functions it calls: in another file they would keep running an earlier kernel.
# The plugin's signatures: per sample, (outputs' data pointers, their shapes, their ranks, how
# many), then the same for the inputs; setup: shapes and ranks of outputs and inputs, samples.
RUN_SIGNATURE = nt.void(nt.uint64, nt.uint64, nt.uint64, nt.int32, nt.uint64, nt.uint64, nt.uint64, nt.int32)
SETUP_SIGNATURE = nt.void(nt.uint64, nt.uint64, nt.int32, nt.uint64, nt.uint64, nt.int32, nt.int32)


@extending.intrinsic
def _pointer(typingctx, address):
    """An integer address as a void pointer (what carray needs)."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return nt.voidptr(address), codegen


@cfunc(RUN_SIGNATURE, nopython=True, cache=True)
def run_one_sample(out_ptr, out_shapes_ptr, out_ndims_ptr, num_outs, in_ptr, in_shapes_ptr,
                   in_ndims_ptr, num_ins):
    outs = carray(_pointer(out_ptr), 1, dtype=np.int64)
    ins = carray(_pointer(in_ptr), 3, dtype=np.int64)
    out_shapes = carray(_pointer(out_shapes_ptr), 1, dtype=np.int64)
    in_shapes = carray(_pointer(in_shapes_ptr), 3, dtype=np.int64)
    shape = carray(_pointer(in_shapes[0]), 3, dtype=np.int64)
    out_shape = carray(_pointer(out_shapes[0]), 3, dtype=np.int64)
    n_params = carray(_pointer(in_shapes[1]), 1, dtype=np.int64)
    image = carray(_pointer(ins[0]), (shape[0], shape[1], shape[2]), dtype=np.uint8)
    out = carray(_pointer(outs[0]), (out_shape[0], out_shape[1], out_shape[2]), dtype=np.uint8)
    params = carray(_pointer(ins[1]), n_params[0], dtype=np.float32)
    matrix = carray(_pointer(ins[2]), (1, 3, 3), dtype=np.float32)
    jitter_image(out, image, params, matrix)


@cfunc(SETUP_SIGNATURE, nopython=True, cache=True)
def output_shapes(out_shapes_ptr, out_ndims_ptr, num_outs, in_shapes_ptr, in_ndims_ptr, num_ins,
                  num_samples):
    """Each sample's output has its image's shape (input 0)."""
    outs = carray(_pointer(out_shapes_ptr), (1, num_samples), dtype=np.int64)
    ins = carray(_pointer(in_shapes_ptr), (3, num_samples), dtype=np.int64)
    for i in range(num_samples):
        out_shape = carray(_pointer(outs[0, i]), 3, dtype=np.int64)
        in_shape = carray(_pointer(ins[0, i]), 3, dtype=np.int64)
        for d in range(3):
            out_shape[d] = in_shape[d]
