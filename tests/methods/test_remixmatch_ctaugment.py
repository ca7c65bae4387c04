"""CTAugment (simmatch/methods/remixmatch/ctaugment.py) against hand-worked numbers and against the
official code (google-research/remixmatch libml/ctaugment.py), transcribed here in the test's own
functions: its ops, its draws (with a numpy Generator in place of the global RNGs) and its update,
run with NumPy 2's arithmetic."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from simmatch.methods.remixmatch.ctaugment import (
    OP_INDEX,
    OPS,
    RATE_SLICES,
    CTAugment,
    cutout,
    cutout_at,
    from_uint8,
    probe_accuracy,
    to_uint8,
)

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]


def image(w: int = 16, h: int = 12, seed: int = 0) -> Image.Image:
    """Not square, so that a width/height mix-up shows."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def normalised(u8: torch.Tensor) -> torch.Tensor:
    """[n, 3, H, W] uint8 as the data pipeline delivers it: (u8 / 255 - mean) / std, float32."""
    return (u8.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def batch(n: int = 6, side: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    u8 = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, side, side), dtype=np.uint8))
    return u8, normalised(u8)


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


# ---- the official update and draws, transcribed ----

def off_rate_arrays() -> dict[str, tuple[np.ndarray, ...]]:
    return {op.name: tuple(np.ones(n, "f") for n in op.bins) for op in OPS}


def off_update_rates(rates, policy, accuracy, decay=0.99):
    """CTAugment.update_rates (NumPy 2: the Python floats meet float32 scalars as float32)."""
    for k, bins in policy:
        for p, rate in zip(bins, rates[k]):
            p = int(p * len(rate) * 0.999)
            rate[p] = rate[p] * decay + accuracy * (1 - decay)


def off_rate_to_p(rate, decay=0.99, th=0.8):
    p = rate + (1 - decay)
    p = p / p.max()
    p[p < th] = 0
    return p


def off_policy(gen, rates, probe, depth=2):
    """CTAugment.policy with gen.integers for random.choice and gen for np.random."""
    kl = [op.name for op in OPS]
    v = []
    for _ in range(depth):
        k = kl[gen.integers(len(kl))]
        bins = rates[k]
        rnd = gen.uniform(0, 1, len(bins))
        if probe:
            v.append((OP_INDEX[k], rnd.tolist()))
            continue
        vt = []
        for r, b in zip(rnd, bins):
            p = off_rate_to_p(b)
            segments = p[1:] + p[:-1]
            segment = gen.choice(segments.shape[0], p=segments / segments.sum())
            vt.append(float((segment + r) / segments.shape[0]))
        v.append((OP_INDEX[k], vt))
    return v


def flat(rates: dict[str, tuple[np.ndarray, ...]]) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([a for op in OPS for a in rates[op.name]]))


# ---- the table ----

def test_remixmatch_ctaugment_ops_are_the_official_table_in_its_order():
    assert [op.name for op in OPS] == [
        "autocontrast", "blur", "brightness", "color", "contrast", "cutout", "equalize", "invert", "identity",
        "posterize", "rescale", "rotate", "sharpness", "shear_x", "shear_y", "smooth", "solarize",
        "translate_x", "translate_y"]
    bins = {op.name: op.bins for op in OPS}
    assert bins["identity"] == () and bins["posterize"] == (8,) and bins["rescale"] == (17, 6)
    assert all(b == (17,) for name, b in bins.items() if name not in ("identity", "posterize", "rescale"))
    assert CTAugment().rates.shape == (16 * 17 + 8 + 17 + 6,)
    assert RATE_SLICES[OP_INDEX["rescale"]][1].stop - RATE_SLICES[OP_INDEX["rescale"]][1].start == 6


# ---- the update ----

def test_remixmatch_ctaugment_update_matches_hand_numbers():
    cta = CTAugment(depth=2, threshold=0.8, decay=0.99)
    b, r, i = OP_INDEX["brightness"], OP_INDEX["rescale"], OP_INDEX["identity"]
    policies = [[(b, [0.5]), (r, [1.0, 0.5])],  # bins int(0.5 * 17 * .999) = 8; 16 (v = 1.0); int(2.997) = 2
                [(b, [0.52]), (i, [])]]  # bin int(8.83) = 8 again; identity teaches nothing
    cta.update(cta.encode(policies), torch.tensor([0.25, 0.75]))
    bright, (scale, method) = cta.op_rates(b)[0], cta.op_rates(r)
    # 1 * 0.99 + 0.25 * 0.01 = 0.9925, then 0.9925 * 0.99 + 0.75 * 0.01 = 0.990075
    np.testing.assert_allclose(bright, [1] * 8 + [0.990075] + [1] * 8, rtol=1e-6)
    np.testing.assert_allclose(scale, [1] * 16 + [0.9925], rtol=1e-6)
    np.testing.assert_allclose(method, [1, 1, 0.9925, 1, 1, 1], rtol=1e-6)
    touched = {RATE_SLICES[b][0].start + 8, RATE_SLICES[r][0].start + 16, RATE_SLICES[r][1].start + 2}
    untouched = [k for k in range(cta.rates.numel()) if k not in touched]
    assert torch.equal(cta.rates[untouched], torch.ones(len(untouched)))
    # and bit for bit the official update under NumPy 2 (float32 arithmetic)
    rates = off_rate_arrays()
    off_update_rates(rates, [("brightness", [0.5]), ("rescale", [1.0, 0.5])], np.float32(0.25))
    off_update_rates(rates, [("brightness", [0.52]), ("identity", [])], np.float32(0.75))
    assert torch.equal(cta.rates, flat(rates))


def test_remixmatch_ctaugment_update_is_the_officials_bit_for_bit_over_many_probes():
    cta, rates = CTAugment(decay=0.95), off_rate_arrays()
    gen = np.random.default_rng(3)
    policies = [cta.sample(gen, probe=True) for _ in range(300)]
    acc = gen.random(300).astype(np.float32)
    for _ in range(2):  # twice: the second pass starts from learned rates
        cta.update(cta.encode(policies), torch.from_numpy(acc))
        for policy, a in zip(policies, acc):
            off_update_rates(rates, [(OPS[k].name, v) for k, v in policy], a, decay=0.95)
    assert torch.equal(cta.rates, flat(rates))


def test_remixmatch_ctaugment_probe_accuracy_is_one_minus_half_the_l1_error():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.0, 1.0, 0.0]])
    acc = probe_accuracy(probs, torch.tensor([0, 0, 1]))
    # |0.7 - 1| + 0.2 + 0.1 = 0.6 -> 0.7; 0.9 + 0.1 + 0.8 = 1.8 -> 0.1; exact -> 1
    assert acc.dtype == torch.float32
    torch.testing.assert_close(acc, torch.tensor([0.7, 0.1, 1.0]))


def test_remixmatch_ctaugment_rate_to_p_zeroes_bins_under_the_threshold():
    cta = CTAugment(threshold=0.8, decay=0.99)
    # + 0.01: [1.01, 0.91, 0.81, 0.01] / 1.01 = [1, 0.90099, 0.80198, 0.0099]
    np.testing.assert_allclose(cta.rate_to_p(np.array([1.0, 0.9, 0.8, 0.0], "f")), [1, 0.9009901, 0.8019802, 0],
                               rtol=1e-6)
    # [0.51, 0.46, 0.31] / 0.51 = [1, 0.90196, 0.60784]: the last is under 0.8
    np.testing.assert_allclose(cta.rate_to_p(np.array([0.5, 0.45, 0.3], "f")), [1, 0.9019608, 0], rtol=1e-6)
    assert cta.rate_to_p(np.ones(5, "f")).tolist() == [1.0] * 5


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


# ---- sampling ----

def half_zero_rates(cta: CTAugment) -> None:
    """Every rate array's first n // 2 bins at 0 (p = 0.01 / 1.01, under the threshold)."""
    for slices in RATE_SLICES:
        for s in slices:
            cta.rates[s.start:s.start + (s.stop - s.start) // 2] = 0


def test_remixmatch_ctaugment_sampler_never_draws_between_two_zeroed_bins():
    cta = CTAugment()
    half_zero_rates(cta)
    gen = np.random.default_rng(0)
    seen = {}
    for _ in range(1500):
        for k, values in cta.sample(gen, probe=False):
            assert len(values) == len(OPS[k].bins)
            for j, (v, n) in enumerate(zip(values, OPS[k].bins)):
                # segments i < n // 2 - 1 have both ends zeroed: v >= (n // 2 - 1) / (n - 1)
                assert (n // 2 - 1) / (n - 1) <= v < 1, (OPS[k].name, j, v)
                seen.setdefault((k, j), []).append(v)
    assert len(seen) == sum(len(op.bins) for op in OPS)  # every array drawn
    assert min(seen[(OP_INDEX["brightness"], 0)]) < 8 / 16 + 0.02  # the first allowed segment is reached


def test_remixmatch_ctaugment_probe_values_are_uniform_whatever_the_rates():
    cta = CTAugment()
    half_zero_rates(cta)
    gen = np.random.default_rng(0)
    values, ops = [], []
    for _ in range(3000):
        for k, v in cta.sample(gen, probe=True):
            ops.append(k)
            values.extend(v)
    counts = np.histogram(values, bins=10, range=(0, 1))[0] / len(values)
    assert np.abs(counts - 0.1).max() < 0.02 and min(values) >= 0 and max(values) < 1
    op_counts = np.bincount(ops, minlength=len(OPS)) / len(ops)
    assert np.abs(op_counts - 1 / len(OPS)).max() < 0.02  # ops uniform too


def test_remixmatch_ctaugment_sampling_is_the_officials_draw_for_draw():
    cta, rates = CTAugment(), off_rate_arrays()
    gen = np.random.default_rng(5)
    policies = [cta.sample(gen, probe=True) for _ in range(50)]
    acc = gen.random(50).astype(np.float32)
    cta.update(cta.encode(policies), torch.from_numpy(acc))
    for policy, a in zip(policies, acc):
        off_update_rates(rates, [(OPS[k].name, v) for k, v in policy], a)
    for probe in (True, False):
        g1, g2 = np.random.default_rng(9), np.random.default_rng(9)
        ours = [cta.sample(g1, probe) for _ in range(100)]
        assert ours == [off_policy(g2, rates, probe) for _ in range(100)]


def test_remixmatch_ctaugment_same_seed_same_policies_and_they_survive_encoding():
    cta = CTAugment()
    half_zero_rates(cta)
    for probe in (True, False):
        a = [cta.sample(np.random.default_rng(4), probe) for _ in range(3)]
        assert a[0] == a[1] == a[2]
        gen = np.random.default_rng(4)
        policies = [cta.sample(gen, probe) for _ in range(40)]
        assert policies[0] == a[0] and policies[1] != policies[0]
        enc = cta.encode(policies)
        assert enc.dtype == torch.float64 and enc.shape == (40, 2, 3)
        assert cta.decode(enc) == policies
        ident = [(OP_INDEX["identity"], []), (OP_INDEX["rescale"], [0.25, 0.75])]
        assert torch.isnan(cta.encode([ident])[0, 0, 1:]).all() and cta.decode(cta.encode([ident])) == [ident]


# ---- batches ----

def identity_only(cta: CTAugment) -> CTAugment:
    cta._sample = lambda gen, probe, table: [(OP_INDEX["identity"], [])] * cta.depth
    return cta


def test_remixmatch_ctaugment_identity_policies_give_the_batch_back():
    u8, x = batch()
    assert np.array_equal(to_uint8(x, MEAN, STD), u8.permute(0, 2, 3, 1).numpy())  # recovered exactly
    cta = identity_only(CTAugment())
    out, policies = cta.augment_batch(x, MEAN, STD, np.random.default_rng(0))
    assert out.dtype == x.dtype and out.shape == x.shape and policies.shape == (6, 2, 3)
    assert np.array_equal(to_uint8(out, MEAN, STD), u8.permute(0, 2, 3, 1).numpy())
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)
    img, probe, pp = cta.augment_labeled(x, MEAN, STD, np.random.default_rng(0))
    torch.testing.assert_close(img, x, rtol=0, atol=1e-6)
    torch.testing.assert_close(probe, x, rtol=0, atol=1e-6)


def test_remixmatch_ctaugment_augment_batch_is_each_samples_child_generator_in_order():
    u8, x = batch(5)
    cta = CTAugment()
    half_zero_rates(cta)
    out, policies = cta.augment_batch(x, MEAN, STD, np.random.default_rng(2))
    children = np.random.default_rng(2).spawn(5)
    expected, pols = [], []
    for i, g in enumerate(children):
        pols.append(cta.sample(g, probe=False))
        expected.append(np.asarray(cta.apply(Image.fromarray(u8[i].permute(1, 2, 0).numpy()), pols[-1], g)))
    assert cta.decode(policies) == pols
    assert np.array_equal(to_uint8(out, MEAN, STD), np.stack(expected))


def test_remixmatch_ctaugment_augment_labeled_probe_then_training_from_the_same_view():
    u8, x = batch(5)
    cta = CTAugment()
    half_zero_rates(cta)
    img, probe, pp = cta.augment_labeled(x, MEAN, STD, np.random.default_rng(3))
    children = np.random.default_rng(3).spawn(5)
    for i, g in enumerate(children):
        view = Image.fromarray(u8[i].permute(1, 2, 0).numpy())
        probe_policy = cta.sample(g, probe=True)
        assert cta.decode(pp[i:i + 1])[0] == probe_policy
        assert np.array_equal(to_uint8(probe[i:i + 1], MEAN, STD)[0], np.asarray(cta.apply(view, probe_policy, g)))
        trained = cta.apply(view, cta.sample(g, probe=False), g)
        assert np.array_equal(to_uint8(img[i:i + 1], MEAN, STD)[0], np.asarray(trained))


def test_remixmatch_ctaugment_augment_batch_is_deterministic():
    _, x = batch(8)
    cta = CTAugment()
    half_zero_rates(cta)
    a, pa = cta.augment_batch(x, MEAN, STD, np.random.default_rng(1))
    b, pb = cta.augment_batch(x, MEAN, STD, np.random.default_rng(1))
    assert torch.equal(a, b) and torch.equal(pa.nan_to_num(), pb.nan_to_num())
    gen = np.random.default_rng(1)
    first, p1 = cta.augment_batch(x, MEAN, STD, gen)
    second, p2 = cta.augment_batch(x, MEAN, STD, gen)  # the same generator again: new children
    assert torch.equal(first, a) and not torch.equal(p1.nan_to_num(), p2.nan_to_num())


def test_remixmatch_ctaugment_state_dict_resumes_the_same_policy():
    _, x = batch(4)
    cta = CTAugment()
    gen = np.random.default_rng(0)
    _, _, pp = cta.augment_labeled(x, MEAN, STD, gen)
    cta.update(pp, torch.tensor([0.1, 0.9, 0.5, 0.3]))
    state = cta.state_dict()
    assert list(state) == ["rates"] and state["rates"].dtype == torch.float32
    again = CTAugment()
    again.load_state_dict(state)
    assert torch.equal(again.rates, cta.rates)
    a = cta.augment_labeled(x, MEAN, STD, np.random.default_rng(6))
    b = again.augment_labeled(x, MEAN, STD, np.random.default_rng(6))
    assert all(torch.equal(u.nan_to_num(), v.nan_to_num()) for u, v in zip(a, b))


def test_remixmatch_ctaugment_float16_and_channels_last_batches():
    u8, x = batch(4)
    cta = CTAugment()
    half = x.half()
    assert np.array_equal(to_uint8(half, MEAN, STD), u8.permute(0, 2, 3, 1).numpy())  # recovered exactly
    out, _ = cta.augment_batch(half, MEAN, STD, np.random.default_rng(0))
    ref, _ = cta.augment_batch(x, MEAN, STD, np.random.default_rng(0))
    assert out.dtype == torch.float16 and out.shape == x.shape
    assert torch.equal(out, ref.half())  # the same uint8 images, normalised then cast
    cl = x.contiguous(memory_format=torch.channels_last)
    out, _ = cta.augment_batch(cl, MEAN, STD, np.random.default_rng(0))
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, ref)
    assert identity_only(CTAugment()).augment_batch(x, MEAN, STD, np.random.default_rng(0))[0].is_contiguous()


def test_remixmatch_ctaugment_from_uint8_is_the_pipelines_normalisation():
    u8, x = batch(3)
    assert torch.equal(from_uint8(u8.permute(0, 2, 3, 1).numpy(), MEAN, STD, x), x)


def test_remixmatch_ctaugment_stats_lists_every_op():
    cta = CTAugment()
    half_zero_rates(cta)
    lines = cta.stats().splitlines()
    assert [line.split()[0] for line in lines] == sorted(op.name for op in OPS)
    rescale = next(line for line in lines if line.startswith("rescale"))
    assert rescale[:20] == "rescale" + " " * 13  # "%-16s    %s" as the official
    assert rescale[20:] == " ".join(["0.00"] * 8 + ["1.00"] * 9) + " / 0.00 0.00 0.00 1.00 1.00 1.00"
