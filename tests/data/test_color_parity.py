"""The DALI strong view's colour ops against torchvision's, on real photos.

Op by op (same parameters): mean absolute difference <= 2/255 and no pixel off by more than
3/255 from torchvision.transforms.v2.functional on float images. The jitter as a whole: its
per-image order is one of the 24 drawn uniformly, and the output is torchvision's ops applied
in that order. The strong view as a whole (jitter p 0.8, grayscale p 0.2, blur p 0.5) has the
statistics of the torch backend's over many draws. Every test runs on DALI's CPU operators
and, where CUDA exists, on the GPU.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")
pytest.importorskip("sklearn")

from nvidia.dali import fn, pipeline_def  # noqa: E402
from torchvision.transforms.v2 import functional as F  # noqa: E402

from dali_pipelines import color  # noqa: E402

pytestmark = pytest.mark.timeout(300)
MEAN_TOL, MAX_TOL = 2.0, 3.0  # grey levels out of 255
# four ops in a row: each rounds to uint8 and later factors (up to 1.4 x 1.4) amplify it
JITTER_MAX_TOL = 6.0
DEVICES = ["cpu", pytest.param("gpu", marks=[
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU variant skipped")])]
REFERENCE = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The reference ops are many tiny tensors: one thread is 30x faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """scikit-learn's two sample photos (china.jpg, flower.jpg), 96 x 64 px, uint8 HWC."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    return [np.asarray(Image.fromarray(a).resize((96, 64), Image.BILINEAR))
            for a in load_sample_images().images]


def run_dali(graph: Callable, images: list[np.ndarray], device: str, factors=None,
             iters: int = 1, seed: int = 0) -> list[list[np.ndarray]]:
    """Outputs of graph(images[, factors]) per iteration, as numpy; factors are per-sample
    CPU scalars (the way the real pipeline's random draws arrive)."""
    batch = len(images)

    @pipeline_def(batch_size=batch, num_threads=1, device_id=0 if device == "gpu" else None,
                  seed=seed, enable_conditionals=True)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        if device == "gpu":
            x = x.gpu()
        if factors is None:
            out = graph(x)
        else:
            f = fn.external_source(source=lambda: [np.float32(v) for v in factors], batch=True)
            out = graph(x, f)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    p = pipe()
    p.build()
    runs = []
    for _ in range(iters):
        outs = p.run()
        cpu = [o.as_cpu() if hasattr(o, "as_cpu") else o for o in outs]
        runs.append([[np.array(o.at(i)) for i in range(batch)] for o in cpu])
    return runs


def to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255.0


def to_levels(t: torch.Tensor) -> np.ndarray:
    return (t * 255.0).permute(1, 2, 0).numpy().astype(np.float64)


def assert_close(out: np.ndarray, ref: np.ndarray, what: str, max_tol: float = MAX_TOL) -> None:
    diff = np.abs(out.astype(np.float64) - ref)
    assert out.shape == ref.shape and out.dtype == np.uint8, what
    assert diff.mean() <= MEAN_TOL and diff.max() <= max_tol, (
        f"{what}: mean |diff| {diff.mean():.3f}, max {diff.max():.2f} grey levels")


OP_FACTORS = {
    "brightness": (0.6, 1.0, 1.4, 1.9),
    "contrast": (0.0, 0.6, 1.4, 1.9),
    "saturation": (0.0, 0.6, 1.4, 1.9),
    "hue": (-0.5, -0.1, 0.03, 0.1, 0.3, 0.5),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["brightness", "contrast", "contrast_arithmetic", "saturation",
                                "hue"])
def test_op_matches_torchvision(photos, op, device):
    """Each op with per-sample factors (inside and beyond ColorJitter's ranges) on both photos."""
    name = op.split("_")[0]
    k = color.OP_NAMES.index(name)
    adjust = color.ADJUST[k]
    if op == "contrast_arithmetic":  # the GPU formulation, checked on the CPU too
        def adjust(x, f):
            return color.adjust_contrast(x, f, arithmetic=True)
    factors = OP_FACTORS[name]
    images = [p for p in photos for _ in factors]
    per_sample = [f for _ in photos for f in factors]
    (out,), = run_dali(adjust, images, device, factors=per_sample)
    for img, f, o in zip(images, per_sample, out):
        ref = to_levels(REFERENCE[k](to_tensor(img), f))
        assert_close(o, ref, f"{op} {f}")


@pytest.mark.parametrize("device", DEVICES)
def test_hue_on_every_colour(device):
    """A 64 x 64 image of all 4,096 colours of a 16-level RGB cube (greys, ties for the max
    channel, every sextant): each pixel within 1/255 of torchvision's HSV rotation."""
    levels = np.arange(0, 256, 17, dtype=np.uint8)
    cube = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(64, 64, 3)
    factors = (-0.5, -0.27, -0.01, 0.1, 0.45)
    (out,), = run_dali(color.adjust_hue, [cube] * len(factors), device, factors=factors)
    for f, o in zip(factors, out):
        diff = np.abs(o - to_levels(F.adjust_hue(to_tensor(cube), f)))
        assert diff.max() <= 1.0, (f, diff.max())


@pytest.mark.parametrize("device", DEVICES)
def test_grayscale_matches_torchvision(photos, device):
    (out,), = run_dali(color.grayscale, photos, device)
    for img, o in zip(photos, out):
        assert_close(o, to_levels(F.rgb_to_grayscale(to_tensor(img), num_output_channels=3)),
                     "grayscale")
        assert np.array_equal(o[..., 0], o[..., 1]) and np.array_equal(o[..., 0], o[..., 2])


def test_dali_builtin_colour_ops_are_not_torchvisions(photos):
    """Why color.py exists: DALI's YIQ hue and fixed-centre contrast miss the tolerance."""
    (hue, contrast), = run_dali(lambda x: (fn.hsv(x, hue=36.0), fn.color_twist(x, contrast=0.6)),
                                photos, "cpu")
    for img, h, c in zip(photos, hue, contrast):
        t = to_tensor(img)
        assert np.abs(h - to_levels(F.adjust_hue(t, 0.1))).mean() > MEAN_TOL
        assert np.abs(c - to_levels(F.adjust_contrast(t, 0.6))).mean() > MEAN_TOL


def _jitter(x):
    y, draws = color.color_jitter(x, 0.4, 0.4, 0.4, 0.1)
    return (y, draws["order"], *(draws[n] for n in color.OP_NAMES))


@pytest.mark.parametrize("device", DEVICES)
def test_jitter_draws_an_order_per_image_and_applies_it(photos, device):
    """480 images: every one of the 24 orders occurs, their counts pass a chi-square test, the
    factors lie in ColorJitter(0.4, 0.4, 0.4, 0.1)'s ranges, and each output is torchvision's
    four ops applied in the drawn order with the drawn factors (not in a fixed order)."""
    small = [np.ascontiguousarray(p[::2, ::2]) for p in photos]  # 48 x 32: 480 references stay fast
    images = [small[i % 2] for i in range(120)]
    orders, order_matters = [], 0
    for out, order, *factors in run_dali(_jitter, images, device, iters=4, seed=7):
        for i, img in enumerate(images):
            o, fs = int(order[i]), [float(f[i]) for f in factors]
            orders.append(o)
            assert all(0.6 <= f <= 1.4 for f in fs[:3]) and -0.1 <= fs[3] <= 0.1
            t = drawn = to_tensor(img)
            for k in color.PERMUTATIONS[o]:
                drawn = REFERENCE[k](drawn, fs[k])
            for k in range(4):  # the fixed order brightness, contrast, saturation, hue
                t = REFERENCE[k](t, fs[k])
            drawn, fixed = to_levels(drawn), to_levels(t)
            assert_close(out[i], drawn, f"jitter order {color.PERMUTATIONS[o]} factors {fs}",
                         JITTER_MAX_TOL)
            order_matters += np.abs(out[i] - fixed).max() > JITTER_MAX_TOL
    counts = np.bincount(orders, minlength=24)
    chi2 = float(((counts - 20.0) ** 2 / 20.0).sum())
    assert counts.min() > 0 and chi2 < 49.7, (counts, chi2)  # 23 dof, p = 0.001
    assert order_matters > 50, order_matters  # a fixed order would fail the check above


def _strong(cfg):
    from dali_pipelines.unlabeled import simclr_strong

    return lambda x: simclr_strong(x, cfg)


def view_stats(views: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-channel statistics over many augmented views of one photo, in [0, 1] units."""
    v = np.stack(views).astype(np.float64) / 255.0  # N H W C
    means, stds = v.mean(axis=(1, 2)), v.std(axis=(1, 2))
    grey = (np.abs(v[..., 0] - v[..., 1]).max(axis=(1, 2)) <= 1 / 255) & (
        np.abs(v[..., 0] - v[..., 2]).max(axis=(1, 2)) <= 1 / 255)
    return {"mean": means.mean(0), "spread": means.std(0), "std": stds.mean(0),
            "grey": np.array([grey.mean()])}


@pytest.mark.parametrize("device", DEVICES)
def test_solarize_matches_torchvision_exactly(photos, device):
    """PIL's / torchvision's solarize (threshold 128): every level, every photo, no difference."""
    ramp = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (4, 1, 3))
    for img in [ramp, *photos]:
        (out,), = run_dali(color.solarize, [img], device)[0]
        ref = F.solarize(torch.from_numpy(img.copy()).permute(2, 0, 1), 128).permute(1, 2, 0).numpy()
        assert np.array_equal(out, ref)


# the default strong view, and SimMatchV2's multi-crop colour (saturation 0.2, solarize: at p
# 0.5 here rather than its 0.1, so that a wrong solarize would move the statistics)
MULTICROP_COLOUR = ["data.saturation=0.2", "data.solarize_prob=0.5"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("overrides", [[], MULTICROP_COLOUR], ids=["default", "multicrop"])
def test_strong_view_distribution_matches_torch_backend(photos, device, overrides):
    """400 strong views (colour part: jitter p 0.8, grayscale p 0.2, blur p 0.5, solarize)
    per photo from DALI and from the torch backend's transforms: per-channel mean, spread of
    the mean over views and mean std agree within 0.02 (their sampling errors at 400 views are
    3-4 times smaller), and both have grey views in the share gray_prob."""
    from PIL import Image

    from simmatch.config import load_config
    from simmatch.data.torch_backend import simclr_colour_ops

    cfg = load_config(None, overrides).data
    torch_ops = simclr_colour_ops(cfg)
    torch.manual_seed(0)
    for p in photos:
        runs = run_dali(_strong(cfg), [p] * 100, device, iters=4, seed=3)
        dali = [v for (views,) in runs for v in views]
        ref = []
        for _ in range(400):
            img = Image.fromarray(p)
            for op in torch_ops:
                img = op(img)
            ref.append(np.asarray(img))
        a, b = view_stats(dali), view_stats(ref)
        for key in ("mean", "spread", "std"):
            assert np.abs(a[key] - b[key]).max() <= 0.02, (key, a[key], b[key])
        for share in (a["grey"], b["grey"]):  # 0.07: 3.5 standard errors at 400 views
            assert abs(share[0] - cfg.gray_prob) <= 0.07, (a["grey"], b["grey"])
