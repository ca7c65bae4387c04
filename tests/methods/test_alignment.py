import torch

from simmatch.methods.alignment import DistributionAlignment


def test_rows_sum_to_one():
    da = DistributionAlignment(7, length=4)
    for s in range(10):
        p = torch.softmax(torch.randn(16, 7, generator=torch.Generator().manual_seed(s)), 1)
        out = da(p)
        torch.testing.assert_close(out.sum(1), torch.ones(16))
        assert (out >= 0).all()


def test_constant_stream_maps_to_uniform():
    p = torch.tensor([[0.7, 0.2, 0.1]]).repeat(5, 1)
    da = DistributionAlignment(3, length=8)
    for _ in range(3):
        out = da(p)
    torch.testing.assert_close(out, torch.full((5, 3), 1 / 3))


def test_fifo_uses_only_last_n_batches():
    da = DistributionAlignment(2, length=2)
    da(torch.tensor([[0.9, 0.1]]))
    da(torch.tensor([[0.5, 0.5]]))
    out = da(torch.tensor([[0.5, 0.5]]))  # the first batch has left the queue
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.5]]))
    # reference: p_model = mean of last two = [0.5,0.5]
