"""CTAugment, ReMixMatch's augmentation policy learned while it trains (google-research/remixmatch,
libml/ctaugment.py, libml/augment.py AugmentPoolCTA, cta/lib/train.py), as this project's own code.

Why here: the policy depends on the training state (its rates learn from the EMA model's accuracy on
probe images every step), so it cannot live in the data pipeline. It runs on the CPU in the training
process, after either data backend (DALI or torch) has delivered the flipped and translated views:
the normalised views go back to uint8, get a policy of `depth` PIL ops each, and are normalised again.

A policy is `depth` ops drawn uniformly from `OPS`, each with one value in [0, 1) per bin array of the
op. A training policy draws each value from a bin array's learned rates; a probe policy uniformly. The
rates are one float32 buffer (`CTAugment.rates`), so a checkpoint resumes the same policy bit for bit.

The official quirks kept on purpose (so that the policy is the one ReMixMatch published):
- translate_x/translate_y shift by (2d - 1) * 0.3 PIXELS, not a fraction of the side: with PIL's
  nearest resampling such a shift never moves a pixel, so both ops are the identity in effect.
- cutout names (width, height) = img.size "height, width", a box of 2 * (size // 2) px (none for
  size 1) centred on a drawn pixel and clipped at the edges; grey (127, 127, 127).
- a training value is drawn between bin centres (segments p[i] + p[i + 1], `len(bins) - 1` of them)
  but updates bin int(v * len(bins) * 0.999).
- rescale crops float boxes (PIL rounds them) and resizes back with a drawn resampling filter.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

Policy = list[tuple[int, list[float]]]  # (index into OPS, one value in [0, 1) per bin array of the op)
CUTOUT_FILL = (127, 127, 127)
# rescale's filters by int(method * 5.99); LANCZOS is what the official code calls ANTIALIAS
RESCALE_METHODS = (Image.Resampling.LANCZOS, Image.Resampling.BICUBIC, Image.Resampling.BILINEAR,
                   Image.Resampling.BOX, Image.Resampling.HAMMING, Image.Resampling.NEAREST)


# ---- the ops (image and values in, new image out), with the official semantics ----

def _blend(img: Image.Image, other: Image.Image, level: float) -> Image.Image:
    """The op's full effect blended in by `level` (0: the image as it is)."""
    return Image.blend(img, other, level)


def _enhance(enhancer: Callable[[Image.Image], Any], img: Image.Image, level: float) -> Image.Image:
    """PIL's enhancement at factor 0.1 .. 2.0 (1.0, the image itself, at level 0.47)."""
    return enhancer(img).enhance(0.1 + 1.9 * level)


def autocontrast(img: Image.Image, level: float) -> Image.Image:
    return _blend(img, ImageOps.autocontrast(img), level)


def blur(img: Image.Image, level: float) -> Image.Image:
    return _blend(img, img.filter(ImageFilter.BLUR), level)


def brightness(img: Image.Image, level: float) -> Image.Image:
    return _enhance(ImageEnhance.Brightness, img, level)


def color(img: Image.Image, level: float) -> Image.Image:
    return _enhance(ImageEnhance.Color, img, level)


def contrast(img: Image.Image, level: float) -> Image.Image:
    return _enhance(ImageEnhance.Contrast, img, level)


def cutout_box(size: tuple[int, int], level: float, x_loc: int, y_loc: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), half-open, of the official cutout: side 1 + int(level * min(size) * 0.499),
    the box +-(side // 2) about (x_loc, y_loc) clipped to the image (so empty for side 1)."""
    side = 1 + int(level * min(size) * 0.499)
    half = side // 2
    return max(0, x_loc - half), max(0, y_loc - half), min(size[0], x_loc + half), min(size[1], y_loc + half)


def cutout_at(img: Image.Image, level: float, x_loc: int, y_loc: int) -> Image.Image:
    """A copy with `cutout_box` painted grey."""
    out = img.copy()  # the official op paints its own fresh image; the caller's stays as it is
    x0, y0, x1, y1 = cutout_box(img.size, level, x_loc, y_loc)
    if x1 > x0 and y1 > y0:
        out.paste(CUTOUT_FILL, (x0, y0, x1, y1))
    return out


def cutout(img: Image.Image, level: float, gen: np.random.Generator) -> Image.Image:
    """Cutout at a position drawn from `gen`: x in [0, width), then y in [0, height) (the official
    draws `height_loc` over img.size[0], the width, first)."""
    x_loc = int(gen.integers(0, img.size[0]))
    y_loc = int(gen.integers(0, img.size[1]))
    return cutout_at(img, level, x_loc, y_loc)


def equalize(img: Image.Image, level: float) -> Image.Image:
    return _blend(img, ImageOps.equalize(img), level)


def invert(img: Image.Image, level: float) -> Image.Image:
    return _blend(img, ImageOps.invert(img), level)


def identity(img: Image.Image) -> Image.Image:
    return img


def posterize(img: Image.Image, level: float) -> Image.Image:
    """Keep the 1 .. 8 high bits."""
    return ImageOps.posterize(img, 1 + int(level * 7.999))


def rescale(img: Image.Image, scale: float, method: float) -> Image.Image:
    """Crop scale * 0.25 px off each side (PIL rounds the box), resize back with a drawn filter."""
    w, h = img.size
    s = scale * 0.25
    return img.crop((s, s, w - s, h - s)).resize(img.size, RESCALE_METHODS[int(method * 5.99)])


def rotate(img: Image.Image, angle: float) -> Image.Image:
    """-45 .. 45 whole degrees counter-clockwise, nearest, black corners."""
    return img.rotate(int(round((2 * angle - 1) * 45)))


def sharpness(img: Image.Image, level: float) -> Image.Image:
    return _enhance(ImageEnhance.Sharpness, img, level)


def _affine(img: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    """Output (x, y) takes the input at matrix . (x + 0.5, y + 0.5, 1), nearest, black outside."""
    return img.transform(img.size, Image.Transform.AFFINE, matrix)


def shear_x(img: Image.Image, shear: float) -> Image.Image:
    """Shear by -0.3 .. 0.3 about the top-left corner."""
    return _affine(img, (1, (2 * shear - 1) * 0.3, 0, 0, 1, 0))


def shear_y(img: Image.Image, shear: float) -> Image.Image:
    return _affine(img, (1, 0, 0, (2 * shear - 1) * 0.3, 1, 0))


def smooth(img: Image.Image, level: float) -> Image.Image:
    return _blend(img, img.filter(ImageFilter.SMOOTH), level)


def solarize(img: Image.Image, threshold: float) -> Image.Image:
    return ImageOps.solarize(img, int(threshold * 255.999))


def translate_x(img: Image.Image, delta: float) -> Image.Image:
    """Shift by (2 delta - 1) * 0.3 PIXELS, as the official ReMixMatch (a no-op with nearest sampling)."""
    return _affine(img, (1, 0, (2 * delta - 1) * 0.3, 0, 1, 0))


def translate_y(img: Image.Image, delta: float) -> Image.Image:
    """As translate_x, vertically (also at most 0.3 px)."""
    return _affine(img, (1, 0, 0, 0, 1, (2 * delta - 1) * 0.3))


class Op(NamedTuple):
    name: str
    bins: tuple[int, ...]  # one rate array per value the op takes, of this many bins
    fn: Callable[..., Image.Image]  # fn(img, *values), and gen=... where `draws`
    draws: bool = False  # True: the op draws from the generator (cutout's position)


# The official registrations, in their order (the op index of a policy is a position here)
OPS: tuple[Op, ...] = (
    Op("autocontrast", (17,), autocontrast), Op("blur", (17,), blur), Op("brightness", (17,), brightness),
    Op("color", (17,), color), Op("contrast", (17,), contrast), Op("cutout", (17,), cutout, draws=True),
    Op("equalize", (17,), equalize), Op("invert", (17,), invert), Op("identity", (), identity),
    Op("posterize", (8,), posterize), Op("rescale", (17, 6), rescale), Op("rotate", (17,), rotate),
    Op("sharpness", (17,), sharpness), Op("shear_x", (17,), shear_x), Op("shear_y", (17,), shear_y),
    Op("smooth", (17,), smooth), Op("solarize", (17,), solarize), Op("translate_x", (17,), translate_x),
    Op("translate_y", (17,), translate_y),
)
OP_INDEX = {op.name: i for i, op in enumerate(OPS)}
MAX_VALUES = max(len(op.bins) for op in OPS)


def _layout() -> tuple[list[list[slice]], int]:
    """Each op's rate arrays as slices of one flat buffer, op after op, array after array."""
    slices, start = [], 0
    for op in OPS:
        mine = []
        for n in op.bins:
            mine.append(slice(start, start + n))
            start += n
        slices.append(mine)
    return slices, start


RATE_SLICES, NUM_RATES = _layout()


def probe_accuracy(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What a probe teaches the rates: 1 - 0.5 * L1(probabilities, one-hot label), float32, in [0, 1]
    (cta/lib/train.py's `1 - 0.5 * error`)."""
    onehot = torch.nn.functional.one_hot(labels.long(), probs.shape[1]).float()
    return 1.0 - 0.5 * (probs.float() - onehot).abs().sum(dim=1)


class CTAugment(nn.Module):
    """The learned policy: a float32 buffer `rates` (every op's bin arrays, see RATE_SLICES, all ones
    at the start), `depth` ops per policy, bins whose normalised rate is below `threshold` never
    drawn, rates moved by `decay`. Each sample of a batch draws from a generator of its own, so the
    images do not depend on the order the samples are worked in (a plain loop: a thread pool was
    2.4x slower on 2 cores, the PIL ops at 32 px being mostly Python under the GIL)."""

    def __init__(self, depth: int = 2, threshold: float = 0.8, decay: float = 0.99):
        super().__init__()
        self.depth, self.threshold, self.decay = depth, threshold, decay
        self.register_buffer("rates", torch.ones(NUM_RATES, dtype=torch.float32))

    # ---- the policy ----

    def op_rates(self, op: int) -> list[np.ndarray]:
        """Copies of op `op`'s rate arrays (float32)."""
        flat = self.rates.detach().cpu().numpy()
        return [flat[s].copy() for s in RATE_SLICES[op]]

    def rate_to_p(self, rate: np.ndarray) -> np.ndarray:
        """A rate array as bin weights: shifted by 1 - decay, scaled to a maximum of 1, the bins below
        the threshold zeroed (float32, as the official NumPy arithmetic)."""
        p = np.asarray(rate, dtype=np.float32) + np.float32(1 - self.decay)
        p = p / p.max()
        p[p < np.float32(self.threshold)] = 0
        return p

    def _segment_probs(self) -> list[list[np.ndarray]]:
        """Per op and rate array, the probabilities of its segments (the spans between neighbouring
        bins, weighted p[i] + p[i + 1]); computed once per batch, the rates fixed meanwhile."""
        flat = self.rates.detach().cpu().numpy()
        table = []
        for slices in RATE_SLICES:
            mine = []
            for s in slices:
                p = self.rate_to_p(flat[s])
                segments = p[1:] + p[:-1]
                mine.append(segments / segments.sum())
            table.append(mine)
        return table

    def sample(self, gen: np.random.Generator, probe: bool) -> Policy:
        """A policy of `depth` ops. Draws, per op in order: its index (gen.integers(len(OPS))), then
        gen.random(number of bin arrays) (probe: the values; else the offsets r), then (not probe) per
        bin array a segment, gen.choice with the segment probabilities; value (segment + r) / segments."""
        return self._sample(gen, probe, None if probe else self._segment_probs())

    def _sample(self, gen: np.random.Generator, probe: bool, table: list[list[np.ndarray]] | None) -> Policy:
        policy = []
        for _ in range(self.depth):
            k = int(gen.integers(len(OPS)))
            r = gen.random(len(OPS[k].bins))
            if probe:
                policy.append((k, r.tolist()))
                continue
            assert table is not None
            values = []
            for r_j, seg_p in zip(r, table[k]):
                segment = gen.choice(len(seg_p), p=seg_p)
                values.append(float((segment + r_j) / len(seg_p)))
            policy.append((k, values))
        return policy

    def apply(self, img: Image.Image, policy: Policy, gen: np.random.Generator) -> Image.Image:
        """The policy's ops in order (cutout draws its position from `gen`); `img` is left as it is."""
        for k, values in policy:
            op = OPS[k]
            img = op.fn(img, *values, gen=gen) if op.draws else op.fn(img, *values)
        return img

    # ---- policies as tensors (they travel between ranks) ----

    def encode(self, policies: Sequence[Policy]) -> torch.Tensor:
        """[n, depth, 1 + MAX_VALUES] float64: op index, then its values, NaN where it has fewer."""
        out = np.full((len(policies), self.depth, 1 + MAX_VALUES), np.nan)
        for i, policy in enumerate(policies):
            if len(policy) != self.depth:
                raise ValueError(f"policy {i} has {len(policy)} ops, CTAugment's depth is {self.depth}")
            for d, (k, values) in enumerate(policy):
                out[i, d, 0] = k
                out[i, d, 1:1 + len(values)] = values
        return torch.from_numpy(out)

    @staticmethod
    def decode(policies: torch.Tensor) -> list[Policy]:
        """The inverse of `encode`."""
        rows = policies.detach().to("cpu", torch.float64).numpy()
        out = []
        for row in rows:
            policy = []
            for entry in row:
                k = int(entry[0])
                policy.append((k, entry[1:1 + len(OPS[k].bins)].tolist()))
            out.append(policy)
        return out

    # ---- learning ----

    @torch.no_grad()
    def update(self, policies: torch.Tensor, accuracies: torch.Tensor) -> None:
        """Per sample in order, per op of its (probe) policy, per value v and the op's j-th rate array
        R: R[int(v * len(R) * 0.999)] = R[..] * decay + accuracy * (1 - decay), in float32 (NumPy 2's
        arithmetic of the official update: decay and 1 - decay rounded to float32 first)."""
        rows = policies.detach().to("cpu", torch.float64).numpy()
        acc = accuracies.detach().to("cpu", torch.float32).numpy()
        if rows.shape[0] != acc.shape[0]:
            raise ValueError(f"{rows.shape[0]} policies but {acc.shape[0]} accuracies")
        rates = self.rates.detach().cpu().numpy().copy()
        keep, learn = np.float32(self.decay), np.float32(1 - self.decay)
        for row, a in zip(rows, acc):
            for entry in row:
                if np.isnan(entry[0]):
                    continue
                for v, s in zip(entry[1:], RATE_SLICES[int(entry[0])]):
                    i = s.start + int(float(v) * (s.stop - s.start) * 0.999)
                    rates[i] = rates[i] * keep + a * learn
        self.rates.copy_(torch.from_numpy(rates))

    def stats(self) -> str:
        """Each op's bin weights (`rate_to_p`), one line an op, by name (the official `stats`)."""
        lines = []
        for name in sorted(OP_INDEX):
            arrays = self.op_rates(OP_INDEX[name])
            lines.append(f"{name:<16}    " + " / ".join(" ".join(f"{x:.2f}" for x in self.rate_to_p(r))
                                                       for r in arrays))
        return "\n".join(lines)

    # ---- batches ----

    def augment_batch(self, x: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                      gen: np.random.Generator, probe: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image of a normalised [n, 3, H, W] batch through a policy of its own: sample i draws
        its policy, then its cutout positions, from child i of gen.spawn(n) (a second call with the same
        `gen` spawns new children). Returns the images (x's device, dtype, memory format) and the
        encoded policies (CPU)."""
        u8 = to_uint8(x, mean, std)
        table = None if probe else self._segment_probs()

        def one(i: int, g: np.random.Generator) -> tuple[np.ndarray, Policy]:
            policy = self._sample(g, probe, table)
            return np.asarray(self.apply(Image.fromarray(u8[i]), policy, g)), policy

        results = [one(i, g) for i, g in enumerate(gen.spawn(len(u8)))]
        images = np.stack([img for img, _ in results]) if results else u8
        return from_uint8(images, mean, std, x), self.encode([p for _, p in results])

    def augment_labeled(self, x: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                        gen: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The labeled batch's (training image, probe image, probe policies): per sample, from child i
        of gen.spawn(n), in order: the probe policy, the probe image's cutout draws, the training
        policy, the training image's; both images from the same input view."""
        u8 = to_uint8(x, mean, std)
        table = self._segment_probs()

        def one(i: int, g: np.random.Generator) -> tuple[np.ndarray, np.ndarray, Policy]:
            img = Image.fromarray(u8[i])
            probe_policy = self._sample(g, True, None)
            probe = np.asarray(self.apply(img, probe_policy, g))
            train = np.asarray(self.apply(img, self._sample(g, False, table), g))
            return train, probe, probe_policy

        results = [one(i, g) for i, g in enumerate(gen.spawn(len(u8)))]
        train = np.stack([r[0] for r in results]) if results else u8
        probe = np.stack([r[1] for r in results]) if results else u8
        return (from_uint8(train, mean, std, x), from_uint8(probe, mean, std, x),
                self.encode([r[2] for r in results]))


def _channel(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float32).view(1, -1, 1, 1)


def to_uint8(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[n, H, W, 3] uint8 of a normalised [n, 3, H, W] batch: round((x * std + mean) * 255), clamped
    (exact for images normalised from uint8, float16 ones included)."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"CTAugment takes [n, 3, H, W] RGB batches, got {tuple(x.shape)}")
    v = (x.detach().to("cpu", torch.float32) * _channel(std) + _channel(mean)) * 255
    return v.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def from_uint8(images: np.ndarray, mean: Sequence[float], std: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """(u8 / 255 - mean) / std in float32 of [n, H, W, 3] uint8, as a [n, 3, H, W] batch on `like`'s
    device and dtype, channels_last if `like` is."""
    v = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    v = ((v - _channel(mean)) / _channel(std)).to(like.device, like.dtype)
    channels_last = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    return v.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
