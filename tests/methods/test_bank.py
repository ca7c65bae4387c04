"""The labeled bank with two real gloo processes writing different rows."""
import pytest
import torch
import torch.nn.functional as F

from simmatch.methods.bank import LabeledBank

K, D = 12, 4


def _rows(rank, step):
    g = torch.Generator().manual_seed(100 * rank + step)
    feats = F.normalize(torch.randn(3, D, generator=g), dim=1)
    idx = torch.tensor([0, 1, 2]) + 3 * rank + 6 * (step % 2)  # disjoint slots per rank
    return feats, idx


def _bank_worker(rank, world, momentum):
    labels = torch.arange(K) % 5
    bank = LabeledBank(K, D, labels, momentum=momentum, seed=3)
    for step in range(3):
        feats, idx = _rows(rank, step)
        bank.update(feats, labels[idx], idx)
    return bank.state_dict()


def _reference(world, momentum):
    labels = torch.arange(K) % 5
    feats = F.normalize(torch.randn(K, D, generator=torch.Generator().manual_seed(3)), dim=1)
    for step in range(3):
        for r in range(world):
            new, idx = _rows(r, step)
            for row, i in zip(new, idx.tolist()):
                if momentum > 0:
                    v = momentum * feats[i] + (1 - momentum) * row
                    feats[i] = v / v.norm()
                else:
                    feats[i] = row
    return feats, labels


def test_two_ranks_hold_identical_correct_banks(gloo, tmp_path):
    states = gloo(_bank_worker, 2, tmp_path, 0.0)
    ref, labels = _reference(2, 0.0)
    for st in states:
        torch.testing.assert_close(st["features"], ref)
        assert torch.equal(st["labels"], labels)
    assert torch.equal(states[0]["features"], states[1]["features"])


def test_momentum_mode_keeps_rows_unit_norm(gloo, tmp_path):
    states = gloo(_bank_worker, 2, tmp_path, 0.7)
    ref, _ = _reference(2, 0.7)
    for st in states:
        torch.testing.assert_close(st["features"], ref)
        torch.testing.assert_close(st["features"].norm(dim=1), torch.ones(K))


def test_single_process_without_group():
    bank = LabeledBank(5, 2, torch.tensor([0, 1, 0, 1, 2]))
    bank.update(torch.tensor([[1.0, 0.0]]), torch.tensor([2]), torch.tensor([3]))
    torch.testing.assert_close(bank.features[3], torch.tensor([1.0, 0.0]))
    assert bank.labels[3] == 2
    assert "features" in bank.state_dict()


@pytest.mark.parametrize("momentum", [0.0, 0.7])
def test_table1_repeated_slots_are_written_once_the_last_wins(momentum):
    """40 labels at 64 a step repeat slots within a step: each slot is written once, with its last
    row (a sequential write's result; CUDA's index_copy_ leaves the winner of repeats undefined)."""
    from simmatch.methods.bank import last_occurrences

    idx = torch.tensor([3, 1, 3, 0, 1, 5, 3])
    assert last_occurrences(idx).tolist() == [3, 4, 5, 6]
    g = torch.Generator().manual_seed(0)
    bank = LabeledBank(6, 4, torch.zeros(6, dtype=torch.long), momentum)
    before = bank.features.clone()
    rows = torch.nn.functional.normalize(torch.randn(7, 4, generator=g), dim=1)
    labels = torch.arange(7)
    bank.update(rows, labels, idx)
    expect, expect_labels = before.clone(), torch.zeros(6, dtype=torch.long)
    for i, slot in enumerate(idx.tolist()):  # a loop: each write from the bank as it was, the last one kept
        v = momentum * before[slot] + (1 - momentum) * rows[i] if momentum else rows[i]
        expect[slot] = v / v.norm()
        expect_labels[slot] = labels[i]
    torch.testing.assert_close(bank.features, expect)
    assert bank.labels.tolist() == expect_labels.tolist()
