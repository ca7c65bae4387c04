"""Evaluation of the trunk's representation: weighted k-NN and a linear probe on frozen features.

Both use the labeled set (validation transforms) as training data and the validation split as
queries, so a self-supervised run (ISD) that never trains its classifier can still be scored.
"""
from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F

from simmatch import distributed as dist


@torch.no_grad()
def embed(model: torch.nn.Module, batches: Iterable[dict], autocast: AbstractContextManager | None = None,
          channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised pooled trunk features (fp32) and labels of this rank's batches."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for batch in batches:
        x = batch["x"].contiguous(memory_format=torch.channels_last) if channels_last else batch["x"]
        with autocast or nullcontext():
            f = model.features(x)
        feats.append(F.normalize(f.float(), dim=1))
        labels.append(batch["y"].long())
    model.train(was_training)
    device = next(model.parameters()).device
    if not feats:
        empty = torch.zeros(0, getattr(model, "feat_dim", 1), device=device)
        return empty, torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(feats), torch.cat(labels)


def global_top1(predicted: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Top-1 (%) and query count over every rank's predictions."""
    hits = (predicted == labels).sum()
    totals = dist.all_reduce_sum(torch.stack([hits, torch.tensor(labels.shape[0], device=hits.device)]).double())
    return 100.0 * float(totals[0]) / max(1.0, float(totals[1])), int(totals[1])


def knn_predict(memory: torch.Tensor, memory_labels: torch.Tensor, queries: torch.Tensor,
                num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class of each query by the k most similar memory rows, each voting exp(sim / T)."""
    k = min(k, memory.shape[0])
    preds = []
    for lo in range(0, queries.shape[0], chunk):
        sim = queries[lo:lo + chunk] @ memory.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=sim.dtype)
        votes.scatter_add_(1, memory_labels[top_idx], (top_sim / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=queries.device)


@torch.no_grad()
def knn_accuracy(model: torch.nn.Module, memory_batches: Iterable[dict], query_batches: Iterable[dict],
                 num_classes: int, k: int = 20, temperature: float = 0.07,
                 autocast: AbstractContextManager | None = None, channels_last: bool = False) -> dict:
    """k-NN top-1 (%) over every rank's queries against the memory of all ranks."""
    mem, mem_y = embed(model, memory_batches, autocast, channels_last)
    mem, mem_y = dist.all_gather_uneven(mem), dist.all_gather_uneven(mem_y)
    q, q_y = embed(model, query_batches, autocast, channels_last)
    top1, count = global_top1(knn_predict(mem, mem_y, q, num_classes, k, temperature), q_y)
    return {"knn_top1": top1, "count": count, "memory": int(mem.shape[0])}


def fit_linear(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, weight_decay: float = 1e-4,
               steps: int = 300, init: torch.nn.Linear | None = None) -> torch.nn.Linear:
    """Multinomial logistic regression, full batch, L-BFGS from zero weights (or from `init`'s, a
    warm start along a grid of weights): deterministic, no learning rate to tune, and no draw from
    the global random state. It minimises mean cross-entropy + weight_decay / 2 * |W|^2 (the bias
    is not penalised): scikit-learn's LogisticRegression with C = 1 / (weight_decay * n)."""
    linear = torch.nn.Linear(train_x.shape[1], num_classes, device=train_x.device, dtype=train_x.dtype)
    with torch.no_grad():
        linear.weight.copy_(init.weight) if init is not None else linear.weight.zero_()
        linear.bias.copy_(init.bias) if init is not None else linear.bias.zero_()
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(linear(train_x), train_y) + 0.5 * weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return linear


@torch.no_grad()
def linear_probe(model: torch.nn.Module, train_batches: Iterable[dict], test_batches: Iterable[dict],
                 num_classes: int, weight_decay: float = 1e-4,
                 autocast: AbstractContextManager | None = None, channels_last: bool = False) -> dict:
    """Top-1 (%) of a linear classifier fitted on the frozen, normalised trunk features."""
    x, y = embed(model, train_batches, autocast, channels_last)
    x, y = dist.all_gather_uneven(x), dist.all_gather_uneven(y)
    linear = fit_linear(x, y, num_classes, weight_decay)
    q, q_y = embed(model, test_batches, autocast, channels_last)
    top1, count = global_top1(linear(q).argmax(dim=1), q_y)
    return {"linear_top1": top1, "count": count, "train": int(x.shape[0])}
