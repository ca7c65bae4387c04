"""The CPU graphs' colour jitter, one compiled operator (dali_pipelines/jitter_kernel.py), gives every
image what the graph of DALI operators gives it (the GPU graphs' jitter, color.py): the same draws
from the same seed and the same levels, bit for bit.

Run on real photos (crops of scikit-learn's two photographs, of many sizes up to 400 x 560) and
on images made to hit the kernel's edges (grey pixels, ties for the largest channel, 0 and 255),
with every op enabled and with disabled ops (an empty factor range), and as part of the whole
unlabeled pipeline on JPEG files. That the levels are torchvision's is test_color_parity.py's
(its jitter test runs this operator on the CPU).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

pytest.importorskip("nvidia.dali")
pytest.importorskip("numba")
pytest.importorskip("sklearn")

from conftest_data import jittered_levels  # noqa: E402
from dali_pipelines import color  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def photo_crops() -> list[np.ndarray]:
    """32 crops of 20-224 px a side from scikit-learn's two photographs, and two of 400 x 560 px
    (a channel's sum past 2^24, where float32 sums stop being exact), uint8 HWC."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(3)
    out = []
    for i in range(32):
        photo = load_sample_images().images[i % 2]
        h, w = int(rng.integers(20, 225)), int(rng.integers(20, 225))
        h, w = (400, 560) if i < 2 else (224, 224) if i < 6 else (h, w)
        y, x = int(rng.integers(0, photo.shape[0] - h)), int(rng.integers(0, photo.shape[1] - w))
        out.append(np.ascontiguousarray(photo[y:y + h, x:x + w]))
    return out


def edge_images() -> list[np.ndarray]:
    """Greys, every tie for the max channel, the extremes, a 1 x 1 image, a colour cube."""
    levels = np.arange(0, 256, 51, dtype=np.uint8)  # 0, 51, ..., 255
    cube = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(12, 18, 3)
    grey = np.repeat(np.arange(0, 256, 1, dtype=np.uint8)[:, None], 3, axis=1).reshape(16, 16, 3)
    ties = np.array([[[200, 200, 10], [200, 10, 200], [10, 200, 200], [255, 255, 255]],
                     [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.uint8)
    return [cube, grey, ties, np.full((1, 1, 3), 128, np.uint8)] * 4


def jittered(images: list[np.ndarray], factors: tuple, fused: bool, iters: int = 4):
    """(levels, order) per image and iteration, from color_jitter with the kernel or the operators."""
    def jitter(x, *f):
        out, draws = color.color_jitter(x, *f, fused=fused)
        return out, draws["order"]

    return jittered_levels(jitter, images, factors, iters)


def assert_same(operators, kernel) -> None:
    assert [o for _, o in operators] == [o for _, o in kernel]  # the same draws
    diff = [int(np.abs(a.astype(int) - b).max()) for (a, _), (b, _) in zip(operators, kernel)]
    assert max(diff) == 0, f"{sum(d > 0 for d in diff)} of {len(diff)} images differ, by up to {max(diff)} levels"


@pytest.mark.parametrize("factors", [(0.4, 0.4, 0.4, 0.1), (0.4, 0.4, 0.4, 0.0), (0.8, 0.0, 0.9, 0.5),
                                     (0.0, 0.0, 0.0, 0.5), (0.0, 0.9, 0.0, 0.0)])
def test_the_kernel_gives_every_photo_the_operator_graphs_levels(photo_crops, factors):
    operators, kernel = jittered(photo_crops, factors, False), jittered(photo_crops, factors, True)
    assert len({o for _, o in kernel}) == 24  # every order drawn
    assert_same(operators, kernel)


def test_the_kernel_gives_the_edge_cases_the_operator_graphs_levels():
    images = edge_images()
    assert_same(jittered(images, (0.9, 0.9, 0.9, 0.5), False, 8), jittered(images, (0.9, 0.9, 0.9, 0.5), True, 8))


def test_a_jittered_image_changes(photo_crops):
    """A kernel that copied its input would pass the comparisons only if the graph did too."""
    out = jittered(photo_crops[:4], (0.4, 0.4, 0.4, 0.1), True, 1)
    assert all(np.abs(o.astype(int) - img).mean() > 1.0 for (o, _), img in zip(out, photo_crops[:4]))


def test_the_unlabeled_pipeline_gives_the_same_views_either_way(tmp_path, monkeypatch):
    """The whole unlabeled CPU graph (decode, crops, flips, jitter, grayscale, blur, normalise) on
    JPEG files: with the kernel and with the operator graph, every view equal and from the same
    seeds."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from dali_pipelines.common import build
    from dali_pipelines.unlabeled import unlabeled_pipeline
    from simmatch.config import DataConfig

    files = []
    for i, photo in enumerate(load_sample_images().images * 8):
        y, x = 13 * i, 17 * i
        files.append(f"p{i}.jpg")
        Image.fromarray(photo[y:y + 200, x:x + 260]).save(tmp_path / files[-1], quality=90)
    cfg = DataConfig(crop_size=64, jitter_prob=0.8, blur_prob=0.5)

    def views(fused: bool) -> list[np.ndarray]:
        original = color.color_jitter
        monkeypatch.setattr(color, "color_jitter", functools.partial(original, fused=fused))
        pipe = build(unlabeled_pipeline, device="cpu", device_id=None, batch_size=8, num_threads=2, seed=5,
                     prefetch=1, cfg=cfg, file_root=str(tmp_path), files=files, indices=list(range(len(files))))
        monkeypatch.setattr(color, "color_jitter", original)
        return [np.array(o.as_tensor()) for _ in range(4) for o in pipe.run()]

    operators, kernel = views(False), views(True)
    assert len(operators) == len(kernel) == 12
    for a, b in zip(operators, kernel):
        assert a.shape == b.shape and np.array_equal(a, b)
