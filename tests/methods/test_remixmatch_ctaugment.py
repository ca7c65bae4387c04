"""CTAugment (simmatch/methods/remixmatch/ctaugment.py) against hand-worked numbers and against the
official code (google-research/remixmatch libml/ctaugment.py), transcribed here in the test's own
functions: its op table, its update and its draws (with a numpy Generator in place of the global
RNGs), run with NumPy 2's arithmetic; and its batches (policies applied per sample, the probes,
dtypes and layouts, the state dict). The ops themselves: tests/methods/test_remixmatch_ctaugment_ops.py."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from simmatch.methods.remixmatch.ctaugment import (
    OP_INDEX,
    OPS,
    RATE_SLICES,
    CTAugment,
    from_uint8,
    probe_accuracy,
    to_uint8,
)

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]


def normalised(u8: torch.Tensor) -> torch.Tensor:
    """[n, 3, H, W] uint8 as the data pipeline delivers it: (u8 / 255 - mean) / std, float32."""
    return (u8.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def batch(n: int = 6, side: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    u8 = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, side, side), dtype=np.uint8))
    return u8, normalised(u8)


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
