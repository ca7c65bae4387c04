"""The colour jitter's graph of DALI operators (dali_pipelines/color.py; the GPU graphs run it, and the
CPU graphs' compiled operator reproduces it: test_jitter_kernel.py) gives every image what the
earlier graph gave it.

The earlier graph branched each of the four slots four ways (brightness, contrast, saturation,
hue on the images that drew that op there); the current one runs the ops drawn before the hue in
three passes, the hue once on every image, then the ops drawn after it in three more passes. The
earlier graph is transcribed here in a class of this test's own, built from the same per-op
graph pieces, and both run with the same seed on real photos: the same draws, the same levels,
bit for bit. So does the saturation computed in float and rounded by one cast, against
color_twist's own uint8 output.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

pytest.importorskip("nvidia.dali")
pytest.importorskip("sklearn")

from nvidia.dali import fn, types  # noqa: E402

from conftest_data import jittered_levels  # noqa: E402
from dali_pipelines import color  # noqa: E402

pytestmark = pytest.mark.timeout(300)
ORDERS = list(itertools.permutations(range(4)))


class FourWaySlots:
    """The earlier color_jitter: per slot, one of four branches by the op the slot holds."""

    @staticmethod
    def apply(op, x, steps):
        if op == 0:
            x = steps[0](x)
        elif op == 1:
            x = steps[1](x)
        elif op == 2:
            x = steps[2](x)
        else:
            x = steps[3](x)
        return x

    @classmethod
    def jitter(cls, images, b: float, c: float, s: float, h: float):
        factors = color.draw_factors(b, c, s, h)
        order = fn.random.uniform(values=list(range(24)), dtype=types.INT32)
        steps = [(lambda x, a=adjust: x) if f is None else (lambda x, a=adjust, f=f: a(x, f))
                 for adjust, f in zip((color.adjust_brightness, color.adjust_contrast,
                                       EarlierSaturation.adjust, color.adjust_hue), factors)]
        x = images
        for slot in range(4):
            op = fn.lookup_table(order, keys=list(range(24)), values=[p[slot] for p in ORDERS],
                                 dtype=types.INT32)
            x = cls.apply(op, x, steps)
        return x, order


class EarlierSaturation:
    @staticmethod
    def adjust(images, factor):
        return fn.color_twist(images, saturation=factor)


@pytest.fixture(scope="module")
def crops() -> list[np.ndarray]:
    """32 crops of 80 x 60 px from scikit-learn's two photographs, uint8 HWC."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(3)
    out = []
    for i in range(32):
        photo = load_sample_images().images[i % 2]
        y, x = int(rng.integers(0, photo.shape[0] - 60)), int(rng.integers(0, photo.shape[1] - 80))
        out.append(np.ascontiguousarray(photo[y:y + 60, x:x + 80]))
    return out


def _current(x, b, c, s, h):
    out, draws = color.color_jitter(x, b, c, s, h, fused=False)  # the operator graph (GPU graphs')
    return out, draws["order"]


@pytest.mark.parametrize("factors", [(0.4, 0.4, 0.4, 0.1), (0.4, 0.4, 0.4, 0.0), (0.8, 0.0, 0.9, 0.5)])
def test_the_jitter_gives_each_image_the_earlier_graphs_levels(crops, factors):
    earlier = jittered_levels(FourWaySlots.jitter, crops, factors, 6)
    current = jittered_levels(_current, crops, factors, 6)
    assert len({order for _, order in current}) == 24  # every order drawn, each branch exercised
    assert [o for _, o in earlier] == [o for _, o in current]
    diff = [int(np.abs(a.astype(int) - b).max()) for (a, _), (b, _) in zip(earlier, current)]
    assert max(diff) == 0, f"{sum(d > 0 for d in diff)} of {len(diff)} images differ, by up to {max(diff)} levels"


def test_the_passes_run_each_drawn_order():
    """Slots 0-2 before the hue, the hue, slots 1-3 after it: for each of the 24 orders, the ops
    in the passes (SKIP left out) are the order itself."""
    for k, order in enumerate(ORDERS):
        before = [color.pass_codes(slot, True)[k] for slot in range(3)]
        after = [color.pass_codes(slot, False)[k] for slot in range(1, 4)]
        ran = [op for op in before if op != color.SKIP] + [3] + [op for op in after if op != color.SKIP]
        assert ran == list(order), (order, before, after)
