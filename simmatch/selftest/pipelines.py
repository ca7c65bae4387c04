"""Decoding and the data streams checked against a reference on the same files.

On a GPU: nvJPEG (`mixed`) decoding against PIL, and the DALI GPU streams against the DALI
CPU streams. Everywhere: DALI's CPU decoding against PIL, and (without a GPU) the DALI CPU
streams against the torch backend. The validation stream is deterministic and compared image
by image; training streams draw different random augmentations per backend, so only their
shapes, value ranges and per-channel statistics are compared.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simmatch.config import Config, load_config
from simmatch.errors import DataError, UserError
from simmatch.selftest.report import FAIL, PASS, Check

# Tolerances, in 0..255 pixel levels per image: nvJPEG and libjpeg-turbo differ in IDCT
# rounding and chroma upsampling, GPU and CPU resizing in rounding, DALI and torchvision in
# their antialiased resize; a wrong colour order, crop or normalisation is far above these.
# DALI GPU vs DALI CPU validation images: same operators, so tight. DALI vs torchvision
# (the CPU-only comparison): their centre crops may sit one pixel apart (torchvision rounds
# the offset half to even, DALI half up), so the best of the 9 one-pixel shifts is compared,
# and their antialiased resizes differ by a few levels.
DECODE_MEAN_LEVELS = 3.0
VAL_MEAN_LEVELS = {"same": 4.0, "shifted": 8.0}
VAL_P99_LEVELS = {"same": 32.0, "shifted": 48.0}
# Training views (normalised units): per-channel mean within 0.25, std within a factor 1.35.
STAT_MEAN_TOL = 0.25
STAT_STD_RATIO = 1.35
RANGE_EPS = 0.02
DECODE_FIX = "remove or re-encode the file; python tools/check_data.py DATA lists every one"


def _fix_for(exc: UserError) -> str:
    return DECODE_FIX if isinstance(exc, DataError) else "correct the option or file it names"


@dataclass
class StreamSetup:
    """Which two stream builds are compared, and where their tensors land."""

    name_a: str
    overrides_a: list[str]
    name_b: str
    overrides_b: list[str]
    shift: bool = False  # compare validation images up to a one-pixel crop offset


def stream_config(root: Path, world: int, crop: int, threads: int, extra: list[str]) -> Config:
    """A small config over the sample tree: 4 labels per class, 4 labeled + 16 unlabeled per rank."""
    return load_config(None, [
        f"data.root={root}", "data.num_classes=4", "data.labeled_per_class=4",
        f"data.crop_size={crop}", f"data.num_threads={threads}", "data.prefetch=1", "data.val_batch=8",
        f"train.batch_size={4 * world}", "train.mu=4", "train.seed=7", *extra])


def _pil_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def dali_decode(root: Path, files: list[str], device: str, cfg: Any, device_id: int | None) -> list[np.ndarray]:
    """Every file decoded by the production decoder settings of `device` (cpu | gpu), HWC uint8."""
    from nvidia.dali import fn, pipeline_def

    from dali_pipelines.common import build, decoder_args
    from simmatch.data.base import decode_error
    from simmatch.data.dali_backend import dali_reason
    from simmatch.images.source import FolderSource

    @pipeline_def
    def decode(file_root: str, names: list[str], device: str = "cpu"):
        jpegs, _ = fn.readers.file(file_root=file_root, files=names, labels=list(range(len(names))),
                                   random_shuffle=False, pad_last_batch=True, name="reader")
        return fn.decoders.image(jpegs, **decoder_args(cfg, device))

    pipe = build(decode, device=device, device_id=device_id, batch_size=len(files), num_threads=2,
                 seed=1, prefetch=1, file_root=str(root), names=files)
    try:
        (out,) = pipe.run()
    except RuntimeError as exc:
        raise decode_error(dali_reason(exc), FolderSource(root), files, f"DALI {device} decoding") from None
    if device == "gpu":
        out = out.as_cpu()
    return [np.array(out[i]) for i in range(len(files))]


def check_decode(name: str, root: Path, files: list[str], device: str, cfg: Any,
                 device_id: int | None) -> Check:
    """Decoded pixels against PIL's, per image: same shape, mean |difference| within tolerance."""
    label = "nvJPEG (mixed)" if device == "gpu" else "DALI CPU"
    try:
        images = dali_decode(root, files, device, cfg, device_id)
    except UserError as exc:
        return Check(name, FAIL, str(exc), DECODE_FIX)
    worst, worst_file = 0.0, files[0]
    for rel, got in zip(files, images):
        ref = _pil_rgb(root / rel)
        if got.shape != ref.shape:
            return Check(name, FAIL, f"{root / rel}: {label} gives {got.shape}, PIL {ref.shape}",
                         "report it with the file attached: the decoder misreads it")
        diff = float(np.abs(got.astype(np.float32) - ref.astype(np.float32)).mean())
        if diff > worst:
            worst, worst_file = diff, rel
    text = f"{label} vs PIL on {len(files)} JPEGs: worst mean |diff| {worst:.2f} levels ({worst_file}; " \
           f"tolerance {DECODE_MEAN_LEVELS})"
    if worst > DECODE_MEAN_LEVELS:
        return Check(name, FAIL, text, "the decoder output is wrong: check the DALI install "
                                       "(pip install -e '.[dali]' or '.[dali-cuda120]')")
    return Check(name, PASS, text)


def _levels(diff: torch.Tensor, std: list[float]) -> torch.Tensor:
    """A difference of normalised [N,3,H,W] images in 0..255 pixel levels."""
    return diff.abs() * torch.tensor(std).view(1, 3, 1, 1) * 255.0


def image_differences(xa: torch.Tensor, xb: torch.Tensor, std: list[float],
                      shift: bool) -> tuple[float, float]:
    """(worst per-image mean, 99th percentile) of |xa - xb| in pixel levels; with `shift`, each
    image pair is compared at the one-pixel offset (of 9) where it agrees best."""
    h, w = xa.shape[-2:]
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)] if shift else [(0, 0)]
    means, tails = [], []
    for a, b in zip(xa, xb):
        best = None
        for dy, dx in offsets:
            pa = a[:, max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)]
            pb = b[:, max(0, -dy):h + min(0, -dy), max(0, -dx):w + min(0, -dx)]
            lv = _levels((pa - pb)[None], std)
            if best is None or float(lv.mean()) < float(best.mean()):
                best = lv
        means.append(float(best.mean()))
        tails.append(best.flatten())
    tail = torch.cat(tails)[:2_000_000]
    return max(means), float(torch.quantile(tail, 0.99))


def _streams(cfg: Config, rank: int, world: int, device: torch.device):
    from simmatch.config import derive_scale
    from simmatch.data import build_streams

    scale = derive_scale(cfg, world)
    return build_streams(cfg, scale, scale.ranks_of(rank), rank, device)


def check_val(setup: StreamSetup, base: list[str], root: Path, rank: int, world: int,
              device: torch.device, crop: int, threads: int) -> Check:
    """Validation stream A against B image by image (both deterministic)."""
    name = "val stream"
    try:
        cfg_a = stream_config(root, world, crop, threads, base + setup.overrides_a)
        cfg_b = stream_config(root, world, crop, threads, base + setup.overrides_b)
        a = [b for b in _streams(cfg_a, rank, world, device).val()]
        b = [b for b in _streams(cfg_b, rank, world, device).val()]
    except UserError as exc:
        return Check(name, FAIL, str(exc), _fix_for(exc))
    xa, xb = (torch.cat([t["x"].float().cpu() for t in s]) for s in (a, b))
    ya, yb = (torch.cat([t["y"].cpu() for t in s]) for s in (a, b))
    what = f"{setup.name_a} vs {setup.name_b}"
    if xa.shape != xb.shape or not torch.equal(ya, yb):
        return Check(name, FAIL, f"{what}: shapes {tuple(xa.shape)} / {tuple(xb.shape)}, labels "
                                 f"{'equal' if torch.equal(ya, yb) else 'differ'}",
                     "the two backends disagree on the validation files: report it")
    mean, p99 = image_differences(xa, xb, cfg_a.data.std, setup.shift)
    kind = "shifted" if setup.shift else "same"
    text = (f"{what} on {len(ya)} images at {crop} px{' (best 1-px crop offset)' if setup.shift else ''}: "
            f"worst image mean |diff| {mean:.2f} levels (tolerance {VAL_MEAN_LEVELS[kind]}), 99th "
            f"percentile {p99:.1f} (tolerance {VAL_P99_LEVELS[kind]})")
    if mean > VAL_MEAN_LEVELS[kind] or p99 > VAL_P99_LEVELS[kind]:
        return Check(name, FAIL, text, "the validation transforms differ between the backends "
                                       "(resize, crop or normalisation): report it with this line")
    return Check(name, PASS, text)


def _views(streams, batches: int) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {"labeled": [], "weak": [], "strong": []}
    for _ in range(batches):
        lab, unl = next(streams.labeled), next(streams.unlabeled)
        out["labeled"].append(lab["x"].float().cpu())
        out["weak"].append(unl["weak"].float().cpu())
        out["strong"].append(unl["strong"][0].float().cpu())
    streams.close()
    return {k: torch.cat(v) for k, v in out.items()}


def compare_views(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], mean: list[float],
                  std: list[float]) -> list[str]:
    """Problems between two sets of training views (empty when they agree): shapes, value
    ranges (inside the normalised image of [0, 1]), per-channel means and spreads."""
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    lo, hi = ((0 - m) / s).flatten() - RANGE_EPS, ((1 - m) / s).flatten() + RANGE_EPS
    problems = []
    for view in a:
        xa, xb = a[view], b[view]
        if xa.shape != xb.shape:
            problems.append(f"{view}: shape {tuple(xa.shape)} vs {tuple(xb.shape)}")
            continue
        for tag, x in (("A", xa), ("B", xb)):
            cmin, cmax = x.amin(dim=(0, 2, 3)), x.amax(dim=(0, 2, 3))
            if bool((cmin < lo).any() or (cmax > hi).any()):
                problems.append(f"{view} {tag}: values [{float(cmin.min()):.2f}, {float(cmax.max()):.2f}] "
                                f"outside the normalised range")
        mu_a, mu_b = xa.mean(dim=(0, 2, 3)), xb.mean(dim=(0, 2, 3))
        sd_a, sd_b = xa.std(dim=(0, 2, 3)), xb.std(dim=(0, 2, 3))
        for c in range(3):
            if abs(float(mu_a[c] - mu_b[c])) > STAT_MEAN_TOL:
                problems.append(f"{view} channel {c}: mean {float(mu_a[c]):.3f} vs {float(mu_b[c]):.3f}")
            ratio = float(sd_a[c] / sd_b[c].clamp_min(1e-6))
            if not 1 / STAT_STD_RATIO <= ratio <= STAT_STD_RATIO:
                problems.append(f"{view} channel {c}: std {float(sd_a[c]):.3f} vs {float(sd_b[c]):.3f}")
    return problems


def check_train(setup: StreamSetup, base: list[str], root: Path, rank: int, world: int,
                device: torch.device, crop: int, threads: int, batches: int) -> Check:
    """Labeled and unlabeled (weak, first strong) views of A and B: same statistics.

    Crops cover the whole image (data.min_scale=1) so that a few dozen images give stable
    statistics; the crop size, flips and every colour augmentation still run.
    """
    name = "train streams"
    try:
        full = ["data.min_scale=1.0"]
        cfg_a = stream_config(root, world, crop, threads, base + full + setup.overrides_a)
        cfg_b = stream_config(root, world, crop, threads, base + full + setup.overrides_b)
        a = _views(_streams(cfg_a, rank, world, device), batches)
        b = _views(_streams(cfg_b, rank, world, device), batches)
    except UserError as exc:
        return Check(name, FAIL, str(exc), _fix_for(exc))
    problems = compare_views(a, b, cfg_a.data.mean, cfg_a.data.std)
    n = {k: v.shape[0] for k, v in a.items()}
    text = (f"{setup.name_a} vs {setup.name_b}, {n['labeled']} labeled + {n['weak']} unlabeled images "
            f"(weak, strong) at {crop} px, whole-image crops")
    if problems:
        return Check(name, FAIL, f"{text}: {'; '.join(problems[:4])}",
                     "the training augmentations differ between the backends: report it with this line")
    return Check(name, PASS, f"{text}: shapes, ranges, per-channel mean (+-{STAT_MEAN_TOL}) and std "
                             f"(x{STAT_STD_RATIO}) agree")
