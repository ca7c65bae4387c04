"""Each method's facts in one place (its card, simmatch/methods/), as the recipe shows them: FixMatch
prints the teacher it trains with and no DA queue; the BN batch each method's forwards see; the
ISD recipe's BN floor at any GPU count."""
from __future__ import annotations

import json

import pytest

from conftest import ROOT
from simmatch.config import derive_scale, load_config
from simmatch.errors import ConfigError
from simmatch.launch.recipe import recipe_lines


def recipe_of(cfg_name: str, world: int, *overrides: str) -> tuple[list[str], dict]:
    lines = recipe_lines(load_config(ROOT / "yaml" / f"{cfg_name}.yaml", list(overrides)), world)
    return lines[:-1], json.loads(lines[-1])


def test_fixmatch_recipe_shows_its_own_teacher_and_no_alignment():
    lines, r = recipe_of("in1k_1pct", 8, "method.name=fixmatch")
    assert r["teacher"] == "eman"  # in1k_1pct.yaml configures ema_shuffle_bn: FixMatch's EMA only evaluates
    assert "da_len" not in r and "l_in_start_iter" not in r  # the entries of SimMatch's card only
    assert not any("DA queue" in ln or "L_in" in ln for ln in lines), lines
    assert any(ln.strip().startswith("teacher      eman") for ln in lines)
    # SimMatch from the same file: the configured teacher, its DA queue and L_in
    lines, r = recipe_of("in1k_1pct", 8)
    assert r["teacher"] == "ema_shuffle_bn" and r["da_len"] == 256 and r["l_in_start_iter"] == 3963
    assert any("DA queue     256 batch means" in ln for ln in lines)


def test_remixmatch_alignment_shows_its_own_buffer():
    lines, r = recipe_of("in1k_1pct", 8, "method.simmatch.da_target=labeled")
    assert r["da_len"] == 128 and any("ReMixMatch's: 128 batch means" in ln for ln in lines)


def _bn_images_by_hand(method: str, b: int, bu: int, strong: int, teacher: str) -> int:
    """The images each forward normalises with batch statistics, written out per method."""
    if method == "simmatch":  # student: labeled + every strong view; teacher: labeled + weak
        forwards = [b + strong * bu] + ([b + bu] if teacher == "ema_shuffle_bn" else [])
    elif method == "fixmatch":  # one student forward over labeled, weak and strong; EMA only evaluates
        forwards = [b + bu + strong * bu]
    elif method == "simmatchv2":  # student: labeled + view 0, then each further view; teacher: labeled + weak
        forwards = [b + bu] + [bu] * (strong - 1) + ([b + bu] if teacher == "ema_shuffle_bn" else [])
    elif method == "supervised":
        forwards = [b]
    else:  # isd: student on the first strong view, teacher on the weak view
        forwards = [bu] + ([bu] if teacher == "ema_shuffle_bn" else [])
    return min(forwards)


@pytest.mark.parametrize("method", ["simmatch", "fixmatch", "supervised", "isd", "simmatchv2"])
@pytest.mark.parametrize("teacher", ["eman", "ema_shuffle_bn"])
@pytest.mark.parametrize("strong", [1, 3])
def test_bn_batch_of_each_method(method, teacher, strong):
    cfg = load_config(None, [f"method.name={method}", f"model.teacher={teacher}", f"data.num_strong={strong}",
                             "train.batch_size=24", "train.mu=5"])
    s = derive_scale(cfg, 3)  # 8 labeled + 40 unlabeled per rank
    assert s.bn_group_images == _bn_images_by_hand(method, 8, 40, strong, teacher)


@pytest.mark.parametrize("world", [1, 2, 4, 8, 16, 32, 64, 128, 256])
def test_isd_recipe_keeps_its_bn_batches_above_the_floor(world):
    """A fixed global batch of 256: BN pooled over the smallest group reaching 48 images."""
    cfg = load_config(ROOT / "yaml" / "in1k_isd.yaml")
    s = derive_scale(cfg, world)
    per_rank = 256 // world
    group = next(g for g in range(1, world + 1) if world % g == 0 and g * per_rank >= 48)
    assert (s.bn_group_ranks, s.bn_group_images) == (group, group * per_rank)
    assert s.bn_group_images >= 48


def test_isd_recipe_refuses_per_gpu_bn_that_is_too_small():
    cfg = load_config(ROOT / "yaml" / "in1k_isd.yaml", ["train.bn_group_ranks=1"])
    with pytest.raises(ConfigError, match=r"BN groups would see 8 images .* fewer than train.min_bn_images=48"):
        derive_scale(cfg, 32)
