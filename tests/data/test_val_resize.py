"""data.val_resize is pixels: the shorter side before the centre crop, never below the crop (0:
crop_size x 256 / 224); `--print-config` shows the resize and the crop in effect."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import call_tool
from conftest_data import data_cfg, streams_for
from simmatch.config import load_config
from simmatch.errors import ConfigError

CPU = torch.device("cpu")


def test_resize_below_the_crop_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"data.val_resize=20 is below data.crop_size=32") as err:
        load_config(None, ["data.crop_size=32", "data.val_resize=20"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, resize", [([], 256), (["data.crop_size=32"], 37),
                                               (["data.crop_size=32", "data.val_resize=36"], 36)])
def test_print_config_shows_the_resize_in_pixels(overrides, resize):
    res = call_tool("tools/train.py", "--cfg", "yaml/digits.yaml", "--print-config", "--world-size", "1",
                    "data.val_resize=0", *overrides)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    crop = 32 if overrides else 16
    if not overrides:
        resize = round(16 * 256 / 224)
    assert (r["val_resize"], r["crop_size"]) == (resize, crop)
    assert f"validation: shorter side resized to {resize} px, centre crop {crop} px" in res.stdout


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_validation_images_are_resized_to_the_pixels_given(digits_root, backend):
    """The digits are 32 px: at val_resize 64 the 32 px centre crop is the middle half of each image,
    as torchvision's Resize(64) + CenterCrop(32) cuts it; at 32 it is the whole image."""
    from PIL import Image
    from torchvision.transforms import v2

    from simmatch.data.splits import load_splits

    for size in (32, 64):
        cfg = data_cfg(digits_root, f"data.val_resize={size}", "data.val_batch=16", "data.num_threads=1",
                       backend=backend)
        streams = streams_for(cfg, 0, 1, CPU)
        x = next(streams.val())["x"]
        streams.close()
        splits = load_splits(cfg.data)
        ref = v2.Compose([v2.ToImage(), v2.Resize(size, antialias=True), v2.CenterCrop(32),
                          v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.data.mean, cfg.data.std)])
        expected = torch.stack([ref(Image.open(splits.val_root / f).convert("RGB")) for f in splits.val_files[:16]])
        assert (x - expected).abs().mean() < 0.05, (size, float((x - expected).abs().mean()))
