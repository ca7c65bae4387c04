"""torchvision and synthetic backends: the same Streams interface, shapes and exact resume."""
from __future__ import annotations

import pytest
import torch

from conftest_data import data_cfg, same_batches, streams_for, take
from simmatch.errors import DataError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def streams(digits_root):
    s = streams_for(data_cfg(digits_root, "data.num_threads=1", backend="torch"), 0, 1, CPU)
    yield s
    s.close()


def test_torch_shapes_and_labels(streams):
    b = next(streams.labeled)
    assert b["x"].shape == (8, 3, 32, 32) and b["x"].dtype == torch.float32
    assert torch.equal(streams.bank_labels[b["index"]], b["y"])
    u = next(streams.unlabeled)
    assert u["weak"].shape == (16, 3, 32, 32) and len(u["strong"]) == 1
    assert u["y"].dtype == torch.int64 and (u["y"] >= 0).all()
    assert (u["weak"] - u["strong"][0]).abs().mean() > 0.1


def test_torch_resume_is_exact(streams, digits_root):
    take(streams.labeled, 4)  # crosses an epoch boundary (5 batches per epoch)
    state = streams.train[0].state_dict()
    expected_l, expected_u = take(streams.labeled, 3), take(streams.unlabeled, 2)
    fresh = streams_for(data_cfg(digits_root, "data.num_threads=0", backend="torch"), 0, 1, CPU)
    fresh.train[0].load_state_dict(state)
    assert same_batches(expected_l, take(fresh.labeled, 3))
    assert same_batches(expected_u, take(fresh.unlabeled, 2))


def test_torch_val_exact_on_two_ranks(streams, digits_root):
    y1 = torch.cat([b["y"] for b in streams.val()])
    cfg = data_cfg(digits_root, "data.num_threads=0", backend="torch")
    y2 = torch.cat([b["y"] for r in range(2) for b in streams_for(cfg, r, 2, CPU).val()])
    assert len(y1) == 395 and torch.equal(y1, y2)


def test_torch_corrupt_image_names_the_file(corrupt_root):
    cfg = data_cfg(corrupt_root, "data.num_classes=2", "data.labeled_percent=100",
                   "data.labeled_per_class=0", "train.batch_size=4", "train.mu=1",
                   "data.num_threads=1", backend="torch")
    s = streams_for(cfg, 0, 1, CPU)
    with pytest.raises(DataError, match=r"^cannot decode image .*train/1/bad\.jpg"):
        for _ in range(s.labeled.batches_per_epoch):
            next(s.labeled)
    s.close()


def test_synthetic_backend():
    cfg = data_cfg("", "data.synthetic_size=64", "train.channels_last=true", backend="synthetic")
    s = streams_for(cfg, 1, 2, CPU)
    b, u = next(s.labeled), next(s.unlabeled)
    assert b["x"].shape == (4, 3, 32, 32) and b["x"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(s.bank_labels[b["index"]], b["y"]) and s.num_labeled == 64
    assert u["weak"].shape == (8, 3, 32, 32) and len(u["strong"]) == 1
    state = s.train[0].state_dict()
    nxt = next(s.labeled)["index"].clone()
    s.train[0].load_state_dict(state)
    assert torch.equal(next(s.labeled)["index"], nxt)
    assert sum(len(v["y"]) for v in s.val()) == 32
