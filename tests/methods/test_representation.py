"""k-NN and linear-probe evaluation against loop references and known answers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from simmatch.engine.representation import fit_linear, knn_predict


def loop_knn(memory, labels, query, classes, k, t) -> int:
    sims = sorted(((float(query @ m), int(y)) for m, y in zip(memory, labels)), key=lambda p: -p[0])[:k]
    votes = [0.0] * classes
    for s, y in sims:
        votes[y] += math.exp(s / t)
    return max(range(classes), key=lambda c: votes[c])


@pytest.mark.parametrize("n,q,d,classes,k", [(30, 7, 5, 3, 5), (50, 11, 8, 6, 20), (4, 3, 4, 2, 10)])
def test_knn_matches_loop(n, q, d, classes, k):
    g = torch.Generator().manual_seed(n + q)
    memory = F.normalize(torch.randn(n, d, generator=g), dim=1).double()
    labels = torch.randint(0, classes, (n,), generator=g)
    queries = F.normalize(torch.randn(q, d, generator=g), dim=1).double()
    got = knn_predict(memory, labels, queries, classes, k, 0.07, chunk=4)
    want = [loop_knn(memory, labels, queries[i], classes, min(k, n), 0.07) for i in range(q)]
    assert got.tolist() == want


def test_linear_probe_separates_linearly_separable_classes():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(4, 16) * 3.0
    y = torch.arange(200) % 4
    x = centers[y] + 0.5 * torch.randn(200, 16, generator=g)
    linear = fit_linear(x, y, 4)
    test_y = torch.arange(100) % 4
    test_x = centers[test_y] + 0.5 * torch.randn(100, 16, generator=g)
    assert (linear(test_x).argmax(1) == test_y).float().mean() > 0.97


def _gather_uneven(rank: int, world: int) -> torch.Tensor:
    from simmatch import distributed as dist

    rows = torch.arange(3 * (rank + 1), dtype=torch.float32).view(-1, 1) + 100 * rank
    return dist.all_gather_uneven(rows)


def test_uneven_gather_over_two_ranks(gloo, tmp_path):
    """k-NN memory of ranks holding 3 and 6 rows: every rank gets all 9 in rank order."""
    out = gloo(_gather_uneven, 2, tmp_path)
    want = torch.cat([torch.arange(3.0), torch.arange(6.0) + 100]).view(-1, 1)
    assert torch.equal(out[0], want) and torch.equal(out[1], want)
