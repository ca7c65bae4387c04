"""Linear evaluation on frozen features, as SimCLR and BYOL transfer a representation: an L2
weight chosen on a validation split over a grid, a refit on train + validation with it, the
accuracy on the test split (top-1, or the mean of the per-class accuracies).

Tensors in, numbers out: the features are made and cached by engine/transfer.py; the logistic
regression is representation.fit_linear, the one `tools/eval.py --linear` fits too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from simmatch.engine.representation import fit_linear

METRICS = ("top1", "mean_per_class")


def l2_grid(count: int = 45, low: float = 1e-6, high: float = 1e5) -> list[float]:
    """`count` log-spaced L2 weights from `low` to `high` (BYOL's grid: 45 from 1e-6 to 1e5)."""
    if count == 1:
        return [float(low)]
    step = (math.log10(high) - math.log10(low)) / (count - 1)
    return [10.0 ** (math.log10(low) + i * step) for i in range(count)]


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) row indices, both sorted: round(fraction * n_c) of each class's n_c rows,
    drawn with `seed`, go to validation, but never a class's last row (so every class is fitted)."""
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for cls in torch.unique(labels.cpu()).tolist():
        rows = torch.nonzero(labels.cpu() == cls).flatten()
        rows = rows[torch.randperm(len(rows), generator=g)]
        n_val = min(int(round(len(rows) * fraction)), len(rows) - 1)
        val.append(rows[:n_val])
        train.append(rows[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def class_accuracies(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    """Accuracy (%) of each class's rows; None for a class with no rows."""
    hits = torch.zeros(num_classes, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    labels = labels.cpu()
    counts.index_add_(0, labels, torch.ones(len(labels), dtype=torch.float64))
    hits.index_add_(0, labels, (predicted.cpu() == labels).double())
    return [100.0 * float(h / c) if c > 0 else None for h, c in zip(hits, counts)]


def accuracy(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int, metric: str) -> float:
    """Top-1 (%) over the rows, or the mean over the classes present of each class's accuracy."""
    if metric == "top1":
        return 100.0 * float((predicted.cpu() == labels.cpu()).double().mean()) if len(labels) else 0.0
    if metric == "mean_per_class":
        present = [a for a in class_accuracies(predicted, labels, num_classes) if a is not None]
        return sum(present) / len(present) if present else 0.0
    raise ValueError(f"metric must be one of {METRICS}, not {metric!r}")


@torch.no_grad()
def predict(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x).argmax(dim=1)


@dataclass
class LinearEval:
    """The chosen L2 weight, each weight's validation score, and the test result."""

    metric: str
    l2: float
    accuracy: float
    val_accuracy: dict[float, float] = field(default_factory=dict)
    per_class: list[float | None] = field(default_factory=list)
    n_train: int = 0
    n_val: int = 0
    n_test: int = 0


def choose_l2(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
              num_classes: int, grid: list[float], metric: str = "top1",
              steps: int = 300) -> tuple[float, dict[float, float]]:
    """The grid's weight of the best validation score (ties: the largest weight) and every score.
    Fitted from the largest weight down, each fit starting from the previous solution: the path is
    fixed, so the choice is deterministic, and a weak weight starts near its optimum."""
    scores: dict[float, float] = {}
    previous = None
    for l2 in sorted(grid, reverse=True):
        previous = fit_linear(train_x, train_y, num_classes, l2, steps, init=previous)
        scores[l2] = accuracy(predict(previous, val_x), val_y, num_classes, metric)
    best = max(scores.values())
    return max(l2 for l2, score in scores.items() if score == best), dict(sorted(scores.items()))


def linear_eval(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                test_x: torch.Tensor, test_y: torch.Tensor, num_classes: int, grid: list[float],
                metric: str = "top1", steps: int = 300) -> LinearEval:
    """Choose the L2 weight on (val_x, val_y) (a one-weight grid skips the choice), refit from zero
    on train + validation with it, and score the test rows."""
    if len(grid) > 1:
        l2, scores = choose_l2(train_x, train_y, val_x, val_y, num_classes, grid, metric, steps)
    else:
        l2, scores = float(grid[0]), {}
    linear = fit_linear(torch.cat([train_x, val_x]), torch.cat([train_y, val_y]), num_classes, l2, steps)
    predicted = predict(linear, test_x)
    return LinearEval(metric, l2, accuracy(predicted, test_y, num_classes, metric), scores,
                      class_accuracies(predicted, test_y, num_classes), len(train_y), len(val_y), len(test_y))
