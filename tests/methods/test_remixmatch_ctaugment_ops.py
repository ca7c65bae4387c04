"""CTAugment's ops (simmatch/methods/remixmatch/ctaugment.py) against the official code
(google-research/remixmatch libml/ctaugment.py), transcribed here in the test's own functions: each
op image for image at a range of levels, rescale with each of its filters, cutout at given and at
drawn positions, and a policy applied in its order. The op table, the update, the draws and the
batches: tests/methods/test_remixmatch_ctaugment.py."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from simmatch.methods.remixmatch.ctaugment import OP_INDEX, OPS, CTAugment, cutout, cutout_at


def image(w: int = 16, h: int = 12, seed: int = 0) -> Image.Image:
    """Not square, so that a width/height mix-up shows."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---- the official ops, transcribed (Pillow's current names for ANTIALIAS and AFFINE) ----

def off_enhance(x, op, level):
    return op(x).enhance(0.1 + 1.9 * level)


def off_imageop(x, op, level):
    return Image.blend(x, op(x), level)


def off_filter(x, op, level):
    return Image.blend(x, x.filter(op), level)


def off_cutout(x, level, height_loc, width_loc):
    """The official cutout with its two np.random.randint draws given (it paints x in place)."""
    size = 1 + int(level * min(x.size) * 0.499)
    img_height, img_width = x.size
    upper_coord = (max(0, height_loc - size // 2), max(0, width_loc - size // 2))
    lower_coord = (min(img_height, height_loc + size // 2), min(img_width, width_loc + size // 2))
    pixels = x.load()
    for i in range(upper_coord[0], lower_coord[0]):
        for j in range(upper_coord[1], lower_coord[1]):
            pixels[i, j] = (127, 127, 127)
    return x


def off_posterize(x, level):
    return ImageOps.posterize(x, 1 + int(level * 7.999))


def off_rescale(x, scale, method):
    s = x.size
    scale *= 0.25
    crop = (scale, scale, s[0] - scale, s[1] - scale)
    methods = (Image.Resampling.LANCZOS, Image.Resampling.BICUBIC, Image.Resampling.BILINEAR,
               Image.Resampling.BOX, Image.Resampling.HAMMING, Image.Resampling.NEAREST)
    return x.crop(crop).resize(x.size, methods[int(method * 5.99)])


def off_rotate(x, angle):
    return x.rotate(int(np.round((2 * angle - 1) * 45)))


def off_affine(x, matrix):
    return x.transform(x.size, Image.Transform.AFFINE, matrix)


OFFICIAL = {
    "autocontrast": lambda x, v: off_imageop(x, ImageOps.autocontrast, v),
    "blur": lambda x, v: off_filter(x, ImageFilter.BLUR, v),
    "brightness": lambda x, v: off_enhance(x, ImageEnhance.Brightness, v),
    "color": lambda x, v: off_enhance(x, ImageEnhance.Color, v),
    "contrast": lambda x, v: off_enhance(x, ImageEnhance.Contrast, v),
    "equalize": lambda x, v: off_imageop(x, ImageOps.equalize, v),
    "invert": lambda x, v: off_imageop(x, ImageOps.invert, v),
    "posterize": off_posterize,
    "rotate": off_rotate,
    "sharpness": lambda x, v: off_enhance(x, ImageEnhance.Sharpness, v),
    "shear_x": lambda x, v: off_affine(x, (1, (2 * v - 1) * 0.3, 0, 0, 1, 0)),
    "shear_y": lambda x, v: off_affine(x, (1, 0, 0, (2 * v - 1) * 0.3, 1, 0)),
    "smooth": lambda x, v: off_filter(x, ImageFilter.SMOOTH, v),
    "solarize": lambda x, v: ImageOps.solarize(x, int(v * 255.999)),
    "translate_x": lambda x, v: off_affine(x, (1, 0, (2 * v - 1) * 0.3, 0, 1, 0)),
    "translate_y": lambda x, v: off_affine(x, (1, 0, 0, 0, 1, (2 * v - 1) * 0.3)),
}
LEVELS = [0.0, 0.1, 0.37, 0.5, 0.73, 0.9999]


# ---- the ops ----

@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_remixmatch_ctaugment_op_equals_the_official(name):
    op = OPS[OP_INDEX[name]]
    for seed, level in enumerate(LEVELS):
        img = image(seed=seed)
        ours = np.asarray(op.fn(img, level))
        assert np.array_equal(ours, np.asarray(OFFICIAL[name](img.copy(), level))), (name, level)


def test_remixmatch_ctaugment_rescale_equals_the_official_with_each_filter():
    img = image(20, 14)
    for level in LEVELS:
        for m in range(6):
            method = (m + 0.5) / 6  # int(method * 5.99) = m
            assert np.array_equal(np.asarray(OPS[OP_INDEX["rescale"]].fn(img, level, method)),
                                  np.asarray(off_rescale(img.copy(), level, method))), (level, m)


def test_remixmatch_ctaugment_identity_and_the_pixel_translations_leave_the_image():
    img = image()
    assert OPS[OP_INDEX["identity"]].fn(img) is img
    for v in (0.0, 0.3, 0.9999):  # at most 0.3 px, nearest: the official translate moves nothing
        for name in ("translate_x", "translate_y"):
            assert np.array_equal(np.asarray(OPS[OP_INDEX[name]].fn(img, v)), np.asarray(img))


def test_remixmatch_ctaugment_cutout_equals_the_official_with_the_same_position():
    for w, h in ((16, 12), (9, 20)):
        img = image(w, h)
        for level in LEVELS:
            for x_loc, y_loc in ((0, 0), (w - 1, h - 1), (w // 2, 3), (5, h // 2)):
                ours = cutout_at(img, level, x_loc, y_loc)
                assert np.array_equal(np.asarray(ours), np.asarray(off_cutout(img.copy(), level, x_loc, y_loc)))
            # drawn: height_loc over img.size[0] (the width) first, then width_loc over img.size[1]
            g1, g2 = np.random.default_rng(7), np.random.default_rng(7)
            drawn = off_cutout(img.copy(), level, int(g2.integers(0, w)), int(g2.integers(0, h)))
            assert np.array_equal(np.asarray(cutout(img, level, g1)), np.asarray(drawn))
    img = image()
    before = np.asarray(img).copy()
    assert (np.asarray(cutout_at(img, 0.9, 8, 6)) == 127).all(axis=2).sum() == 6 * 6  # side 6, painted
    assert np.array_equal(np.asarray(img), before)  # on a copy
    assert np.array_equal(np.asarray(cutout_at(img, 0.0, 8, 6)), before)  # side 1: the box is empty


def test_remixmatch_ctaugment_apply_runs_a_policy_in_order():
    cta, img = CTAugment(), image()
    policy = [(OP_INDEX["solarize"], [0.4]), (OP_INDEX["cutout"], [0.6])]
    g1, g2 = np.random.default_rng(1), np.random.default_rng(1)
    expected = off_cutout(OFFICIAL["solarize"](img, 0.4), 0.6, int(g2.integers(0, 16)), int(g2.integers(0, 12)))
    assert np.array_equal(np.asarray(cta.apply(img, policy, g1)), np.asarray(expected))
