"""The paper's Table 5 ablations, `method.simmatch.scaling` and `method.simmatch.smoothing`: on a
hand-worked example of 2 classes and 3 bank rows, the class pseudo-label p_hat and the instance
pseudo-label q_hat each change as the paper's equations say, the defaults give the unablated
targets, and a switch that would change nothing is refused with one line."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import ROOT
from simmatch.config import derive, load_config
from simmatch.errors import ConfigError
from simmatch.launch.recipe import recipe_lines
from simmatch.methods import build_method

ALPHA = 0.9
LABELS = [0, 1, 1]  # the class of each of the 3 bank rows
FEATURES = [[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]  # bank rows; temperature 1 keeps exp() readable
# the weak view of two unlabeled images: class logits and 2-d embeddings
LOGITS = [[0.0, math.log(4.0)], [0.0, 0.0]]
EMBEDDINGS = [[math.log(2.0), 0.0], [0.0, math.log(3.0)]]

# Row 0 worked by hand: p_w = softmax(0, ln 4) = (1/5, 4/5); similarities (ln 2, 0, 0), so
# q_w = (2, 1, 1) / 4 = (0.5, 0.25, 0.25).
#   aggregation: q_agg = (0.5, 0.25 + 0.25) = (0.5, 0.5); p_hat = 0.9 p_w + 0.1 q_agg = (0.23, 0.77)
#   unfolding: p_unfold = (0.2, 0.8, 0.8); q_w p_unfold = (0.1, 0.2, 0.2), sum 0.5 -> q_hat = (0.2, 0.4, 0.4)
HAND = {"p_w": [0.2, 0.8], "q_w": [0.5, 0.25, 0.25], "p_hat": [0.23, 0.77], "q_hat": [0.2, 0.4, 0.4]}


def softmax(xs: list[float]) -> list[float]:
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def reference(scaling: bool, smoothing: bool) -> tuple[list[list[float]], list[list[float]]]:
    """The paper's equations in plain loops: p_hat = alpha p_w + (1 - alpha) q_agg (scaling) or p_w;
    q_hat = q_w p_unfold / sum (smoothing) or q_w."""
    p_hats, q_hats = [], []
    for logits, emb in zip(LOGITS, EMBEDDINGS):
        p_w = softmax(logits)
        q_w = softmax([sum(a * b for a, b in zip(emb, row)) for row in FEATURES])
        q_agg = [0.0, 0.0]
        for j, cls in enumerate(LABELS):
            q_agg[cls] += q_w[j]
        p_hats.append([ALPHA * p_w[c] + (1 - ALPHA) * q_agg[c] for c in range(2)] if scaling else p_w)
        unfolded = [q_w[j] * p_w[LABELS[j]] for j in range(3)]
        q_hats.append([u / sum(unfolded) for u in unfolded] if smoothing else q_w)
    return p_hats, q_hats


def simmatch(*overrides: str):
    """A SimMatch built from its config (resnet10, a 2-d head), its bank set to the example's rows."""
    cfg = load_config(None, ["model.arch=resnet10", "model.small_input=true", "model.proj_dim=2",
                             "data.num_classes=2", "method.simmatch.temperature=1.0",
                             "method.simmatch.dist_align=false", *overrides])
    method = build_method(cfg, derive(cfg, 1, 3, 6), torch.tensor(LABELS))
    method.bank.features.copy_(torch.tensor(FEATURES))
    return method


def targets_of(*overrides: str) -> tuple[torch.Tensor, torch.Tensor]:
    method = simmatch(*overrides)
    with torch.no_grad():
        return method.propagate(torch.tensor(LOGITS), torch.tensor(EMBEDDINGS), torch.tensor(LABELS), 0)


def close(actual: torch.Tensor, expected: list[list[float]]) -> None:
    torch.testing.assert_close(actual.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)


def test_the_hand_worked_row_is_the_loop_reference():
    """The loop reference reproduces the numbers worked by hand (a check of the reference itself)."""
    p_hat, q_hat = reference(True, True)
    assert p_hat[0] == pytest.approx(HAND["p_hat"]) and q_hat[0] == pytest.approx(HAND["q_hat"])
    p_w, q_w = reference(False, False)
    assert p_w[0] == pytest.approx(HAND["p_w"]) and q_w[0] == pytest.approx(HAND["q_w"])


def test_defaults_give_the_unablated_targets():
    p_hat, q_hat = targets_of()
    close(p_hat, reference(True, True)[0])
    close(q_hat, reference(True, True)[1])
    close(p_hat[:1], [HAND["p_hat"]])
    close(q_hat[:1], [HAND["q_hat"]])


def test_scaling_false_makes_p_hat_the_weak_prediction():
    p_hat, q_hat = targets_of("method.simmatch.scaling=false")
    close(p_hat[:1], [HAND["p_w"]])  # (0.2, 0.8), not (0.23, 0.77)
    close(p_hat, reference(False, True)[0])
    close(q_hat[:1], [HAND["q_hat"]])  # q_hat keeps its smoothing
    close(q_hat, reference(False, True)[1])


def test_smoothing_false_makes_q_hat_the_bank_similarity():
    p_hat, q_hat = targets_of("method.simmatch.smoothing=false")
    close(q_hat[:1], [HAND["q_w"]])  # (0.5, 0.25, 0.25), not (0.2, 0.4, 0.4)
    close(q_hat, reference(True, False)[1])
    close(p_hat[:1], [HAND["p_hat"]])  # p_hat keeps its scaling
    close(p_hat, reference(True, False)[0])


def test_both_off_give_p_w_and_q_w():
    p_hat, q_hat = targets_of("method.simmatch.scaling=false", "method.simmatch.smoothing=false")
    close(p_hat, reference(False, False)[0])
    close(q_hat, reference(False, False)[1])


@pytest.mark.parametrize("overrides,words", [
    (["method.simmatch.use_bank=false", "method.simmatch.scaling=false"], "use_bank=false"),
    (["method.simmatch.use_bank=false", "method.simmatch.smoothing=false"], "use_bank=false"),
    (["method.simmatch.alpha=1.0", "method.simmatch.scaling=false"], "alpha=1"),
    (["method.simmatch.lambda_in=0", "method.simmatch.smoothing=false"], "lambda_in=0"),
])
def test_a_switch_without_effect_is_refused(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    text = str(err.value)
    assert "\n" not in text and words in text and ("scaling" in text or "smoothing" in text), text


def test_the_recipe_names_both_switches():
    def line(*overrides: str) -> str:
        lines = recipe_lines(load_config(ROOT / "yaml" / "in1k_1pct.yaml", list(overrides)), 8)
        return next(ln for ln in lines if ln.startswith("  pseudo-label"))

    default = line()
    assert "p_hat = 0.9 p_w + 0.1 q_agg (method.simmatch.scaling=true)" in default
    assert "q_hat = normalize(q_w * p_unfold) (method.simmatch.smoothing=true)" in default
    ablated = line("method.simmatch.scaling=false", "method.simmatch.smoothing=false")
    assert "p_hat = p_w" in ablated and "(method.simmatch.scaling=false)" in ablated
    assert "q_hat = q_w" in ablated and "(method.simmatch.smoothing=false)" in ablated
