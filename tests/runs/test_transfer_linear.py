"""Transfer evaluation's pieces in this process: the logistic regression against its optimality
conditions, the metrics against a hand-counted confusion, the validation draw, the L2 grid, and
tools/transfer.py's refusals of a bad DATA_TREE or bad WEIGHTS (one line, exit 2)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, call_tool
from simmatch.engine.linear_eval import accuracy, choose_l2, class_accuracies, l2_grid, stratified_split
from simmatch.engine.representation import fit_linear


def penalised_gradient(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray, l2: float) -> float:
    """Largest |gradient| of mean cross-entropy + l2 / 2 * |W|^2 (bias free), written out in numpy."""
    logits = x @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(w.shape[0])[y]
    grad_w = (p - onehot).T @ x / len(y) + l2 * w
    grad_b = (p - onehot).mean(0)
    return float(max(np.abs(grad_w).max(), np.abs(grad_b).max()))


def test_transfer_fit_is_the_optimum_of_the_stated_objective():
    """fit_linear reaches zero gradient of mean CE + l2/2 |W|^2 (the objective scikit-learn minimises
    with C = 1 / (l2 n), scaled by 1 / (C n)); a penalty n times larger, the mapping without the
    mean, is not its optimum."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(60, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (60,), generator=g)
    l2 = 0.05
    linear = fit_linear(x, y, 3, l2, steps=500)
    w, b = linear.weight.detach().numpy(), linear.bias.detach().numpy()
    assert penalised_gradient(x.numpy(), y.numpy(), w, b, l2) < 1e-4  # L-BFGS's stopping point
    assert penalised_gradient(x.numpy(), y.numpy(), w, b, l2 * 60) > 1e-2  # control: the other mapping
    assert np.abs(w).max() > 1e-2  # a real fit, not the zero start


def test_transfer_warm_start_reaches_the_same_optimum():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (40,), generator=g)
    cold = fit_linear(x, y, 4, 0.1, steps=500)
    warm = fit_linear(x, y, 4, 0.1, steps=500, init=fit_linear(x, y, 4, 10.0, steps=500))
    assert torch.allclose(cold.weight, warm.weight, atol=1e-3)
    assert torch.allclose(cold.bias - cold.bias.mean(), warm.bias - warm.bias.mean(), atol=1e-3)


def test_transfer_metrics_on_a_hand_counted_confusion():
    """Class 0: 3 of 4 right; class 1: 1 of 2; class 2: 1 of 1; class 3 absent from the test rows."""
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 0, 0, 1, 1, 0, 2])
    assert class_accuracies(predicted, labels, 4) == [75.0, 50.0, 100.0, None]
    assert accuracy(predicted, labels, 4, "mean_per_class") == pytest.approx((75 + 50 + 100) / 3)
    assert accuracy(predicted, labels, 4, "top1") == pytest.approx(100 * 5 / 7)


def test_transfer_stratified_split_holds_out_each_class_share():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1 + [3] * 3)
    train, val = stratified_split(labels, 0.2, seed=0)
    held = {c: int((labels[val] == c).sum()) for c in range(4)}
    assert held == {0: 2, 1: 1, 2: 0, 3: 1}  # round(0.2 n), never a class's only image
    assert sorted(train.tolist() + val.tolist()) == list(range(len(labels)))
    assert train.tolist() == sorted(train.tolist()) and val.tolist() == sorted(val.tolist())
    again = stratified_split(labels, 0.2, seed=0)
    assert torch.equal(again[1], val)
    draws = {tuple(stratified_split(labels, 0.2, seed=s)[1].tolist()) for s in range(5)}
    assert len(draws) > 1  # the seed draws


def test_transfer_l2_grid_is_byols():
    grid = l2_grid()
    assert len(grid) == 45
    assert grid[0] == pytest.approx(1e-6) and grid[-1] == pytest.approx(1e5)
    ratios = {round(math.log10(b / a), 9) for a, b in zip(grid, grid[1:])}
    assert ratios == {0.25}  # 11 decades in 44 equal steps


def test_transfer_choice_takes_the_heaviest_of_equal_scores():
    x = torch.tensor([[3.0, 0.0], [2.5, 0.5], [0.0, 3.0], [0.5, 2.5]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    best, scores = choose_l2(x, y, x, y, 2, [1e-3, 1e-2, 1e-1])
    assert scores == {1e-3: 100.0, 1e-2: 100.0, 1e-1: 100.0}
    assert best == 1e-1


def tiny_tree(root: Path, splits: tuple[str, ...] = ("train", "test")) -> Path:
    from PIL import Image

    for split in splits:
        for cls, value in (("a", 40), ("b", 200)):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (value + i, value, value)).save(root / split / cls / f"{i}.png")
    return root


def test_transfer_refuses_a_bad_data_tree(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, weights)
    res = call_tool("tools/transfer.py", str(weights), str(tmp_path / "absent"))
    assert_one_line_error(res, "DATA_TREE", "absent", "no such directory")
    tiny_tree(tmp_path / "only_train", ("train",))
    res = call_tool("tools/transfer.py", str(weights), str(tmp_path / "only_train"))
    assert_one_line_error(res, "neither a test/ nor a val/")
    tree = tiny_tree(tmp_path / "odd")
    (tree / "test" / "c").mkdir()
    (tree / "test" / "b" / "0.png").rename(tree / "test" / "c" / "0.png")
    res = call_tool("tools/transfer.py", str(weights), str(tree), "--arch", "resnet10")
    assert_one_line_error(res, "'c'", "training split")


def test_transfer_refuses_bad_weights(tmp_path):
    tree = tiny_tree(tmp_path / "tree")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a weight file")
    assert_one_line_error(call_tool("tools/transfer.py", str(garbage), str(tree)), str(garbage))
    assert_one_line_error(call_tool("tools/transfer.py", str(tmp_path / "none.pth"), str(tree)),
                          "none.pth", "no such file")
    plain = tmp_path / "plain.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3)}, plain)
    assert_one_line_error(call_tool("tools/transfer.py", str(plain), str(tree)), "--arch", "no plain.safetensors")
    assert_one_line_error(call_tool("tools/transfer.py", str(plain), str(tree), "--arch", "vgg16"), "'vgg16'")
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    assert_one_line_error(call_tool("tools/transfer.py", str(fake), str(tree)), "fake.safetensors")


def test_transfer_splits_of_a_tree(tmp_path):
    """val/ is the test split when there is no test/; beside test/ it is the validation split."""
    from simmatch.engine.transfer import find_splits

    two = find_splits(tiny_tree(tmp_path / "two", ("train", "val")))
    assert sorted(two) == ["test", "train"] and two["test"].where == str(tmp_path / "two" / "val")
    three = find_splits(tiny_tree(tmp_path / "three", ("train", "val", "test")))
    assert sorted(three) == ["test", "train", "val"] and three["test"].where == str(tmp_path / "three" / "test")
    assert three["val"].tree.files == ["a/0.png", "a/1.png", "b/0.png", "b/1.png"]


def test_transfer_cache_key_follows_images_and_preprocessing(tmp_path):
    from PIL import Image

    from simmatch.engine.transfer import cache_key, find_splits
    from simmatch.engine.transfer_weights import FeatureModel, Preprocess

    tree = tiny_tree(tmp_path / "tree")
    p = Preprocess(16, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    model = FeatureModel(None, "resnet10", True, p, tmp_path / "w.pth", "ab" * 32, "weights")
    key = cache_key(model, find_splits(tree), "folder")
    assert cache_key(model, find_splits(tree), "folder") == key  # nothing changed: the same file
    model.preprocess = Preprocess(16, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear")
    assert cache_key(model, find_splits(tree), "folder") != key
    model.preprocess = p
    Image.new("RGB", (9, 9), (1, 2, 3)).save(tree / "test" / "b" / "1.png")  # another image, same name
    assert cache_key(model, find_splits(tree), "folder") != key


def test_transfer_reads_a_nested_weight_file(tmp_path):
    """A MoCo-style file (nested under state_dict, `module.` prefixes) of a small-stem ResNet: the
    stem is read from conv1's kernel, and the features are the torchvision model's pooled output."""
    import torchvision

    from simmatch.engine.transfer_weights import Overrides, load_feature_model

    torch.manual_seed(0)
    ref = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=5)
    ref.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    ref.maxpool = torch.nn.Identity()
    ref.eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, tmp_path / "w.pth.tar")
    model = load_feature_model(tmp_path / "w.pth.tar", overrides=Overrides(arch="resnet10"))
    assert model.small_input and model.kind == "weights"
    assert (model.preprocess.resize, model.preprocess.crop) == (224, 224)  # no card, no --size
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        want = torch.flatten(ref.avgpool(ref.layer4(ref.layer3(ref.layer2(ref.layer1(
            ref.relu(ref.bn1(ref.conv1(x)))))))), 1)
        assert torch.allclose(model.net.features(x), want, atol=1e-6)
