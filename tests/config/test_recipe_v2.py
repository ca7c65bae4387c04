"""SimMatchV2's published ImageNet recipes (script/train.sh of github mingkai-zheng/SimMatchV2,
8 GPUs) through `tools/train.py --print-config`, and how they scale to 32 GPUs."""
from __future__ import annotations

import pytest
from test_recipe import IN1K_TRAIN, print_config

# The authors' numbers: their label lists (SimCLR's subsets), 320 unlabeled images per step with
# drop_last, 300 epochs, --k 256 global batches in the unlabeled bank, the loss weights of train.sh
V2 = {"in1k_1pct_v2": dict(num_labeled=12_811, steps=3_963, weights=(10.0, 10.0, 10.0)),
      "in1k_10pct_v2": dict(num_labeled=128_116, steps=3_603, weights=(10.0, 5.0, 5.0))}
AUTHORS_CROPS = [[224, 0.14, 1.0], [192, 0.117, 0.86], [160, 0.095, 0.715], [120, 0.073, 0.571], [96, 0.05, 0.429]]


@pytest.mark.parametrize("name", sorted(V2))
def test_v2_at_8_gpus_is_the_authors_recipe(name):
    r, a = print_config(name, 8), V2[name]
    assert r["method"] == "simmatchv2" and r["teacher"] == "ema_shuffle_bn"  # no --eman
    assert (r["labeled_per_gpu"], r["unlabeled_per_gpu"]) == (8, 40)
    assert (r["global_labeled"], r["global_unlabeled"]) == (64, 320)
    assert r["lr"] == pytest.approx(0.03, rel=1e-12) and r["ema_momentum"] == pytest.approx(0.999, rel=1e-12)
    assert (r["num_labeled"], r["num_unlabeled"]) == (a["num_labeled"], IN1K_TRAIN - a["num_labeled"])
    assert (IN1K_TRAIN - a["num_labeled"]) // 320 == a["steps"]
    assert (r["steps_per_epoch"], r["epochs"], r["total_iters"]) == (a["steps"], 300, 300 * a["steps"])
    assert r["warmup_iters"] == 5 * a["steps"]
    assert r["unlabeled_bank"] == 256 * 320 == 81_920
    assert tuple(r["loss_weights"].values()) == a["weights"]
    assert r["da_momentum"] == pytest.approx(0.9, rel=1e-12)
    assert r["strong_views"] == AUTHORS_CROPS
    assert r["bn_group_ranks"] == 1 and r["bn_group_images"] == 40  # each further crop is its own BN batch
    assert "l_in_start_iter" not in r and "da_len" not in r  # SimMatch's L_in and DA queue are not V2's
    assert r["method_params"]["k"] == 256 and r["method_values"] == {"k": 81_920, "da_momentum": pytest.approx(0.9)}


def test_v2_at_32_gpus_scales_k_and_the_da_momentum_with_the_batch():
    r = print_config("in1k_1pct_v2", 32)
    assert r["global_unlabeled"] == 1280 and r["unlabeled_bank"] == 256 * 1280
    assert r["da_momentum"] == pytest.approx(0.9 ** 4, rel=1e-12)  # the same images per unit of momentum
    assert r["lr"] == pytest.approx(0.12, rel=1e-12) and r["steps_per_epoch"] == (IN1K_TRAIN - 12_811) // 1280


def test_v2_print_config_says_k_and_the_views():
    from conftest import call_tool

    out = call_tool("tools/train.py", "--cfg", "yaml/in1k_1pct_v2.yaml", "--print-config", "--world-size", "8").stdout
    assert "unlabeled K = 81,920 (256 global unlabeled batches)" in out and "losses nn / ee / ne x 10 / 10 / 10" in out
    assert "method       simmatchv2: tau 0.7, temperature 0.1, topn 128, alpha 0.1, k 256," in out
    assert "5 strong views of 224 / 192 / 160 / 120 / 96 px" in out
    assert "3,963 steps" in out and "1,188,900 iterations (300 epochs)" in out
