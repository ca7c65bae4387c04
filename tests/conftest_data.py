"""Shared fixtures of the data tests: a tree with a corrupt image, a tree of real photographs, and
config helpers (the digits tree, 16 px, is tests/conftest.py's `digits_root`)."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

import pytest
import torch

from simmatch.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name: str) -> ModuleType:
    """Import tools/<name>.py by path (tools/ is a script folder, not a package)."""
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def data_cfg(root: Path | str, *overrides: str, backend: str = "dali") -> Config:
    """A small CPU config: 10 classes, 4 labels per class (K=40), B=8, mu=2, 32 px crops."""
    base = [f"data.root={root}", "data.num_classes=10", "data.labeled_per_class=4",
            f"data.backend={backend}", "data.device=cpu", "data.crop_size=32",
            "data.num_threads=2", "train.batch_size=8", "train.mu=2", "train.seed=3"]
    return load_config(None, base + list(overrides))


@pytest.fixture(scope="session")
def corrupt_root(tmp_path_factory, digits_root) -> Path:
    """Two classes of six images each; class 1 also holds a truncated JPEG `bad.jpg`."""
    root = tmp_path_factory.mktemp("corrupt")
    for split in ("train", "val"):
        for cls in ("0", "1"):
            dst = root / split / cls
            dst.mkdir(parents=True)
            for src in sorted((digits_root / split / cls).iterdir())[:6]:
                shutil.copy(src, dst / src.name)
    good = sorted((root / "train" / "1").iterdir())[0].read_bytes()
    (root / "train" / "1" / "bad.jpg").write_bytes(good[: len(good) // 3])
    return root


def streams_for(cfg: Config, rank: int = 0, world: int = 1, device: torch.device | str = "cpu",
                frozen_splits: Path | None = None):
    """The streams process `rank` of `world` builds, as the engine builds them: the run's scale at that
    many processes, and the ranks it computes (its own, or its virtual ranks)."""
    from simmatch.config import derive_scale
    from simmatch.data import build_streams

    scale = derive_scale(cfg, world)
    return build_streams(cfg, scale, scale.ranks_of(rank), rank, torch.device(device), frozen_splits=frozen_splits)


def take(stream, n: int) -> list[dict]:
    """n batches, cloned (stream tensors are only valid until the next draw)."""
    out = []
    for _ in range(n):
        batch = next(stream)
        out.append({k: ([t.clone() for t in v] if isinstance(v, list) else v.clone())
                    for k, v in batch.items()})
    return out


def same_batches(a: list[dict], b: list[dict]) -> bool:
    for x, y in zip(a, b, strict=True):
        for key in x:
            xs = x[key] if isinstance(x[key], list) else [x[key]]
            ys = y[key] if isinstance(y[key], list) else [y[key]]
            if not all(torch.equal(p, q) for p, q in zip(xs, ys, strict=True)):
                return False
    return True


@pytest.fixture(scope="session")
def photo_root(tmp_path_factory) -> Path:
    """Real photographs (scikit-learn's china.jpg and flower.jpg): 3 classes of seeded 120 x 90 crops
    as JPEGs of several qualities, one PNG, and names that test the packing: a dotted stem, a
    non-ASCII name and one long enough (> 100 bytes) to need a PAX header."""
    root = tmp_path_factory.mktemp("photos")
    odd = ["a.b.c", "été", "x" * 110]
    for split, c, i, crop, rng in photo_crops(3, {"train": 8, "val": 3}, seed=0):
        folder = root / split / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        stem = odd[c] if i == 0 and split == "train" else f"img{i:02d}"
        if i == 1:
            crop.save(folder / f"{stem}.png")
        else:
            crop.save(folder / f"{stem}.jpg", quality=int(rng.integers(60, 95)))
    return root


def photo_crops(classes: int, counts: dict[str, int], seed: int):
    """(split, class, i, image, generator) for `counts[split]` images of each class: seeded 120 x 90
    crops of scikit-learn's two sample photographs (the generator, for whatever else is drawn)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for split, count in counts.items():
        for c in range(classes):
            for i in range(count):
                photo = photos[(c + i) % 2]
                x, y = int(rng.integers(0, photo.width - 120)), int(rng.integers(0, photo.height - 90))
                yield split, c, i, photo.crop((x, y, x + 120, y + 90)), rng


def jittered_levels(jitter, images: list, factors: tuple, iters: int) -> list[tuple]:
    """(levels, drawn order) per image and iteration of `jitter(x, *factors)` -> (images, order) in a
    CPU pipeline fed `images` (uint8 HWC), seed 17: two jitters compared this way draw alike."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=len(images), num_threads=2, device_id=None, seed=17, enable_conditionals=True)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        return jitter(x, *factors)

    p = pipe()
    p.build()
    seen = []
    for _ in range(iters):
        out, order = p.run()
        seen += [(np.array(out.at(i)), int(np.array(order.at(i)))) for i in range(len(images))]
    return seen
