"""The CIFAR/SVHN/STL-10 augmentations (SimMatch's Table 1): torch backend
(simmatch/data/small_augment.py, PIL's ops) and DALI (dali_pipelines/small_augment.py, CPU
operators), on real photos (scikit-learn's two samples at 32 x 32 and 96 x 96).

Op by op with the same levels, DALI against PIL: the colour ops agree exactly as measured
(tolerance: no pixel off by more than 1 grey level, mean |diff| <= 0.01; posterize, solarize,
equalize and identity: exactly); the geometric ops (nearest sampling) differ only where a
sample point falls on a pixel boundary: at most 1 % of the pixels (measured: 0 at 32 px,
0.12 % for one rotation at 96 px). A whole strong view rebuilt with PIL's ops from the draws
DALI recorded is DALI's view. The weak view reaches every offset 0..2*pad with uniform
frequencies and flips half the images (none with flip off); the strong view draws its ops
uniformly and its Cutout side uniformly in [0, 0.5] of the width, on both backends; both are
deterministic under a seed, and a DALI checkpoint taken mid-stream continues bit-identically.
"""
from __future__ import annotations

import pickle
from collections.abc import Callable

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")
pytest.importorskip("sklearn")

from nvidia.dali import fn, pipeline_def, types  # noqa: E402
from PIL import Image  # noqa: E402

from dali_pipelines import ra_list as L  # noqa: E402
from dali_pipelines import ra_ops as R  # noqa: E402
from dali_pipelines import small_augment as D  # noqa: E402
from dali_pipelines.common import quiet_dali_deprecations  # noqa: E402
from simmatch.data import small_augment as T  # noqa: E402

pytestmark = pytest.mark.timeout(300)
SIDES = (32, 96)
COLOUR_MAX_TOL, COLOUR_MEAN_TOL = 1.0, 0.01  # grey levels
GEOMETRIC_FRACTION_TOL = 0.01  # of the pixels, per image
EXACT = ("posterize", "solarize", "equalize", "identity")
GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
# levels in PIL's units: the ends of each range and points inside it
LEVELS = {
    "auto_contrast": (0,), "equalize": (0,), "identity": (0,),
    "brightness": (0.05, 0.3, 0.7, 0.95), "color": (0.05, 0.3, 0.7, 0.95),
    "contrast": (0.05, 0.3, 0.7, 0.95), "sharpness": (0.05, 0.3, 0.7, 0.95),
    "posterize": (4, 5, 6, 7), "solarize": (0, 37.5, 128, 200.25, 255.9),
    "rotate": (-30, -17.3, -3, 5.5, 22, 30), "shear_x": (-0.3, -0.11, 0.07, 0.3),
    "shear_y": (-0.3, -0.11, 0.07, 0.3), "translate_x": (-0.3, -0.13, 0.05, 0.3),
    "translate_y": (-0.3, -0.13, 0.05, 0.3),
}
CHI2_999 = {8: 26.12, 9: 27.88, 13: 34.53, 24: 51.18}  # chi-square quantile 0.999 by dof


@pytest.fixture(scope="module")
def photos() -> dict[int, list[np.ndarray]]:
    """scikit-learn's two sample photos (china.jpg, flower.jpg), uint8 HWC, per side."""
    from sklearn.datasets import load_sample_images

    images = load_sample_images().images
    return {s: [np.asarray(Image.fromarray(a).resize((s, s), Image.BILINEAR)) for a in images]
            for s in SIDES}


def run_graph(graph: Callable, images: list[np.ndarray], levels=None) -> list[np.ndarray]:
    """graph(images[, levels]) on DALI's CPU operators; levels are per-sample float32."""
    @pipeline_def(batch_size=len(images), num_threads=2, device_id=None, seed=0,
                  enable_conditionals=True)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        if levels is None:
            return graph(x)
        f = fn.external_source(source=lambda: [np.float32(v) for v in levels], batch=True)
        return graph(x, f)

    p = pipe()
    p.build()
    (out,) = p.run()
    return [np.array(out.at(i)) for i in range(len(images))]


def views_pipeline(source: Callable, batch: int, seed: int = 0, checkpoint=None, **kwargs):
    p = D.small_views_pipeline(source=source, batch_size=batch, num_threads=2, device_id=None,
                               seed=seed, checkpoint=checkpoint, **kwargs)
    p.build()
    return p


def as_numpy(outputs) -> list[list[np.ndarray]]:
    return [[np.array(o.at(i)) for i in range(len(o))] for o in outputs]


def diff_stats(out: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    """(max |diff|, mean |diff|, fraction of pixels with any channel different)."""
    d = np.abs(out.astype(np.int32) - ref.astype(np.int32))
    return float(d.max()), float(d.mean()), float((d.max(axis=2) > 0).mean())


def chi2_uniform(values, k: int) -> tuple[np.ndarray, float]:
    counts = np.bincount(np.asarray(values), minlength=k)
    expected = len(values) / k
    return counts, float(((counts - expected) ** 2 / expected).sum())


def test_table1_backends_share_the_recipe():
    """One table (dali_pipelines/ra_list.py): USB's 14 ops, its Cutout, FixMatch's 12.5 % translation;
    each backend implements every op of it."""
    assert len(L.RA_OPS) == 14 and L.CUTOUT_FILL == (125, 123, 114) and L.CUTOUT_MAX == 0.5
    assert [L.pad_for(s) for s in SIDES] == [4, 12]
    assert set(T.OPS) == set(R.PIL_OPS) == set(L.OP_NAMES)


@pytest.mark.parametrize("op", [*LEVELS, "equalize_ops"])
def test_table1_op_matches_pil(photos, op):
    """Each op, both photos at 32 and 96 px, levels across its range, against PIL's op."""
    name = "equalize" if op == "equalize_ops" else op
    images = [p for s in SIDES for p in photos[s] for _ in LEVELS[name]]
    levels = [v for s in SIDES for _ in photos[s] for v in LEVELS[name]]
    if op == "equalize_ops":  # the GPU formulation, checked on the CPU
        def graph(x, _level):
            return R.equalize_ops(x)
    elif op == "posterize":
        def graph(x, level):
            return R.posterize(x, fn.cast(level, dtype=types.INT32))
    else:
        graph = R.PIL_OPS[op]
    out = run_graph(graph, images, levels)
    for img, v, o in zip(images, levels, out):
        ref = np.asarray(T.OPS[name](Image.fromarray(img), float(np.float32(v))))
        assert o.shape == ref.shape and o.dtype == np.uint8, (op, o.shape, o.dtype)
        high, mean, frac = diff_stats(o, ref)
        what = f"{op}({v}) at {img.shape[0]} px: max {high}, mean {mean:.4f}, differing {frac:.2%}"
        if name in EXACT:
            assert high == 0, what
        elif name in GEOMETRIC:
            assert frac <= GEOMETRIC_FRACTION_TOL, what
        else:
            assert high <= COLOUR_MAX_TOL and mean <= COLOUR_MEAN_TOL, what


def test_table1_dali_stock_ops_are_not_pils(photos):
    """Why dali_pipelines/small_augment.py writes its own: auto_aug's brightness rounds (PIL
    truncates), its equalize is OpenCV's formula and its sharpness filters the border too."""
    from nvidia.dali.auto_aug import augmentations as aa

    imgs = photos[32]
    kernel = aa.sharpness_kernel(0.5 - 1.0)

    def stock(x):
        return (aa.brightness.op(x, 0.5), aa.equalize.op(x, None),
                aa.sharpness.op(x, types.Constant(kernel)))

    @pipeline_def(batch_size=len(imgs), num_threads=1, device_id=None, seed=0)
    def pipe():
        return stock(fn.external_source(source=lambda: imgs, batch=True, layout="HWC"))

    with quiet_dali_deprecations():  # auto_aug calls fn.experimental.equalize / filter
        p = pipe()
        p.build()
    for k, outs in enumerate(as_numpy(p.run())):
        for img, o in zip(imgs, outs):
            pil = Image.fromarray(img)
            ref = (T.brightness(pil, 0.5), T.equalize(pil), T.sharpness(pil, 0.5))[k]
            assert diff_stats(o, np.asarray(ref))[1] > COLOUR_MEAN_TOL, k


def test_table1_cutout_box_is_usbs():
    """Inclusive bounds: int(side) + 1 px from x0 = int(max(0, cx - side/2)), moved inside at
    the left/top, cut at the right/bottom; v = 0: no Cutout."""
    assert T.cutout_box(32, 32, 0.25, 16.0, 16.0) == (12, 12, 20, 20)  # side 8: 9 px
    assert T.cutout_box(32, 32, 0.5, 2.0, 30.5) == (0, 22, 16, 31)  # moved right, cut at 31
    assert T.cutout_box(32, 32, 0.001, 7.9, 0.0) == (7, 0, 7, 0)  # a sliver: 1 px
    assert T.cutout_box(32, 32, 0.0, 5.0, 5.0) is None
    img = Image.fromarray(np.zeros((32, 32, 3), np.uint8))
    painted = np.asarray(T.cutout(img, 0.5, 2.0, 30.5)).any(axis=2)
    assert painted[22:, :17].all() and painted.sum() == 17 * 10


def test_table1_torch_weak_is_torchvisions(photos):
    """Under one seed, the torch weak view is torchvision's RandomHorizontalFlip() then
    RandomCrop(side, padding=pad, padding_mode="reflect") (FixMatch's order), pixel for pixel."""
    from torchvision import transforms

    for s in SIDES:
        tv = transforms.Compose([transforms.RandomHorizontalFlip(),
                                 transforms.RandomCrop(s, padding=L.pad_for(s), padding_mode="reflect")])
        for seed in range(20):
            img = photos[s][seed % 2]
            torch.manual_seed(seed)
            ours = np.asarray(T.weak(img, L.pad_for(s)))
            torch.manual_seed(seed)
            assert np.array_equal(ours, np.asarray(tv(Image.fromarray(img)))), (s, seed)


def coordinate_image(side: int) -> np.ndarray:
    """R encodes the row, G the column (distinct levels), B 0."""
    code = (np.arange(side) * 256 // side).astype(np.uint8)
    img = np.zeros((side, side, 3), np.uint8)
    img[..., 0] = code[:, None]
    img[..., 1] = code[None, :]
    return img


def decode_offsets(view: np.ndarray, pad: int) -> tuple[int, int, bool]:
    """(top, left, flipped) of a weak view of coordinate_image: its pixel (pad, pad) is the
    input's (top, left) of the (flipped) image; the next column tells the direction."""
    side = view.shape[0]
    code = list((np.arange(side) * 256 // side).astype(np.uint8))
    row = code.index(view[pad, pad, 0])
    col, nxt = code.index(view[pad, pad, 1]), code.index(view[pad, pad + 1, 1])
    flipped = nxt < col
    return row, (side - 1 - col if flipped else col), flipped


def check_offsets(found: list[tuple[int, int, bool]], pad: int, flip: bool) -> None:
    k = 2 * pad + 1
    for axis in (0, 1):
        counts, chi2 = chi2_uniform([f[axis] for f in found], k)
        assert counts.min() > 0 and len(counts) == k and chi2 < CHI2_999[k - 1], (axis, counts, chi2)
    share = np.mean([f[2] for f in found])
    if flip:
        assert abs(share - 0.5) <= 0.08, share  # 4 standard errors at 600 draws
    else:
        assert share == 0.0


@pytest.mark.parametrize("side,flip", [(32, True), (96, True), (32, False)])
def test_table1_weak_offsets_and_flips(side, flip):
    """600 weak views per backend: both offsets uniform over 0..2*pad (chi-square at p 0.001,
    every offset reached), flips in half of them (none with flip off, SVHN's setting)."""
    pad = L.pad_for(side)
    img = coordinate_image(side)
    torch_found = []
    for seed in range(600):
        torch.manual_seed(seed)
        torch_found.append(decode_offsets(np.asarray(T.weak(img, pad, flip)), pad))
    check_offsets(torch_found, pad, flip)
    p = views_pipeline(lambda info: [img] * 300, 300, seed=side, n_strong=0, pad=pad, flip=flip)
    dali_found = [decode_offsets(v, pad) for _ in range(2) for v in as_numpy(p.run())[0]]
    check_offsets(dali_found, pad, flip)


@pytest.fixture(scope="module")
def strong_run(photos):
    """Two batches of 128 (both photos, 32 px) from small_views_pipeline with two strong views
    and the draws recorded: {output name: list of per-sample arrays}."""
    batch = [photos[32][i % 2] for i in range(128)]
    names = ["weak", "strong0", "strong1", *D.draw_names(n_strong=2)]
    p = views_pipeline(lambda info: batch, 128, seed=11, n_strong=2, draws=True)
    runs = [as_numpy(p.run()) for _ in range(2)]
    out = {n: [v for r in runs for v in r[k]] for k, n in enumerate(names)}
    out["input"] = batch * 2
    return out


def replay_strong(img: np.ndarray, draws: dict, view: str, i: int, pad: int) -> np.ndarray:
    """The strong view rebuilt with the torch backend's PIL ops from DALI's draws (levels in
    float32, as DALI computes them)."""
    arr = img[:, ::-1] if int(draws[f"{view}.flip"][i]) else img
    top, left = int(draws[f"{view}.top"][i]), int(draws[f"{view}.left"][i])
    side = arr.shape[0]
    arr = np.pad(arr, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")[top:top + side, left:left + side]
    ops = []
    for slot in range(2):
        name, low, high = L.RA_OPS[int(draws[f"{view}.op{slot}"][i])]
        u = np.float32(draws[f"{view}.level{slot}"][i])
        ops.append((name, float(u * np.float32(high - low) + np.float32(low))))
    v, cx, cy = (float(c) for c in draws[f"{view}.cutout"][i])
    return np.asarray(T.rand_augment(Image.fromarray(np.ascontiguousarray(arr)), ops, (v, cx, cy)))


def test_table1_dali_strong_view_is_pils_with_its_draws(strong_run):
    """512 strong views: each is PIL's ops applied with the draws DALI recorded (flip,
    offsets, two ops and levels, Cutout); geometric ops may move a few boundary pixels."""
    identical, worst = 0, 0.0
    for view in ("strong0", "strong1"):
        for i, img in enumerate(strong_run["input"]):
            ref = replay_strong(img, strong_run, view, i, 4)
            high, mean, frac = diff_stats(strong_run[view][i], ref)
            identical += high == 0
            worst = max(worst, frac)
    assert worst <= GEOMETRIC_FRACTION_TOL * 2, worst  # two geometric ops in a row
    assert identical >= 0.95 * 512, identical  # measured: 507


def test_table1_strong_op_and_cutout_distributions(strong_run):
    """Ops uniform over the 14 (chi-square at p 0.001, every op drawn), levels and Cutout
    sides uniform over their ranges, on DALI (1,024 op draws) and the torch backend (the
    same number, drawn by the functions `strong` calls)."""
    dali_ops = np.concatenate([strong_run[f"strong{k}.op{s}"] for k in range(2) for s in range(2)])
    dali_levels = np.concatenate([strong_run[f"strong{k}.level{s}"] for k in range(2) for s in range(2)])
    dali_v = np.array([c[0] for k in range(2) for c in strong_run[f"strong{k}.cutout"]])
    torch_ops, torch_levels, torch_v = [], [], []
    for seed in range(512):
        torch.manual_seed(seed)
        for name, level in T.draw_ops(2):
            k = L.OP_NAMES.index(name)
            torch_ops.append(k)
            low, high = L.RA_OPS[k][1:]
            torch_levels.append((level - low) / (high - low) if high > low else 0.5)
        torch_v.append(T.draw_cutout(32, 32)[0])
    for ops, levels, v in ((dali_ops, dali_levels, dali_v),
                           (np.array(torch_ops), np.array(torch_levels), np.array(torch_v))):
        counts, chi2 = chi2_uniform(ops.astype(int), 14)
        assert counts.min() > 0 and chi2 < CHI2_999[13], (counts, chi2)
        assert levels.min() >= 0.0 and levels.max() < 1.0
        assert abs(levels.mean() - 0.5) < 4 * 0.2887 / np.sqrt(len(levels)), levels.mean()
        assert v.min() >= 0.0 and v.max() <= L.CUTOUT_MAX
        _, chi2 = chi2_uniform((v / L.CUTOUT_MAX * 10).astype(int), 10)
        assert chi2 < CHI2_999[9], chi2
    sides = [[T.cutout_box(32, 32, x, 16.0, 16.0)[2] - 11 for x in vs if x > 0] for vs in (dali_v, torch_v)]
    assert abs(np.mean(sides[0]) - np.mean(sides[1])) < 0.6, [np.mean(s) for s in sides]  # ~8.5 px


def test_table1_torch_strong_is_deterministic_per_seed(photos):
    """The same seed gives the same strong view (and the same as replaying the draws in
    order); other seeds give other views; fork_rng leaves the caller's RNG untouched."""
    img = photos[32][0]
    views = {}
    for seed in (3, 3, 4, 5):
        before = torch.get_rng_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            view = np.asarray(T.strong(img, 4, True, 2))
        assert torch.equal(before, torch.get_rng_state())
        if seed in views:
            assert np.array_equal(views[seed], view)
        views[seed] = view
        torch.manual_seed(seed)
        arr = T.flip_crop(img, 4, True)
        ops, box = T.draw_ops(2), T.draw_cutout(32, 32)
        assert np.array_equal(np.asarray(T.rand_augment(Image.fromarray(arr), ops, box)), view)
    assert not np.array_equal(views[3], views[4]) and not np.array_equal(views[4], views[5])
    transform = pickle.loads(pickle.dumps(T.StrongView(12, flip=False, n=3)))  # DataLoader workers
    view = transform(Image.fromarray(photos[96][1]))
    assert isinstance(view, Image.Image) and view.size == (96, 96) and view.mode == "RGB"


def same(a: list[list[np.ndarray]], b: list[list[np.ndarray]]) -> bool:
    """Two runs' outputs (per output, per sample) are bit-identical."""
    return len(a) == len(b) and all(
        len(x) == len(y) and all(np.array_equal(u, w) for u, w in zip(x, y)) for x, y in zip(a, b))


@pytest.mark.slow  # three DALI pipelines built (4 s)
def test_table1_dali_same_seed_and_checkpoint_resume(photos):
    """Same seed, same batches; a checkpoint after 2 batches restores a new pipeline that
    gives batches 3 and 4 bit-identically (RNG states and the source's iteration)."""
    def source(info):  # each iteration its own images: the source's position matters too
        return [np.ascontiguousarray(np.roll(photos[32][i % 2], info.iteration, axis=0))
                for i in range(16)]

    def make(checkpoint=None, seed=5):
        return views_pipeline(source, 16, seed=seed, checkpoint=checkpoint, n_strong=2)

    a, b = make(), make()
    first = [as_numpy(a.run()) for _ in range(2)]
    assert all(same(r, as_numpy(b.run())) for r in first)
    checkpoint = a.checkpoint()
    rest = [as_numpy(a.run()) for _ in range(2)]
    c = make(checkpoint)
    assert all(same(r, as_numpy(c.run())) for r in rest)
    assert not same(as_numpy(make(seed=6).run()), first[0])
