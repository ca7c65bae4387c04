"""SimMatch's propagation against a plain loop over the definitions (DESIGN section 1)."""
import pytest
import torch

from simmatch.methods.simmatch.method import pseudo_labels


def loop_reference(p_w, q_w, bank_labels, alpha):
    b, c = p_w.shape
    k = q_w.shape[1]
    p_hat = torch.zeros(b, c, dtype=torch.float64)
    q_hat = torch.zeros(b, k, dtype=torch.float64)
    for i in range(b):
        agg = [0.0] * c
        for j in range(k):
            agg[int(bank_labels[j])] += float(q_w[i, j])
        for cls in range(c):
            p_hat[i, cls] = alpha * float(p_w[i, cls]) + (1 - alpha) * agg[cls]
        unfolded = [float(q_w[i, j]) * float(p_w[i, int(bank_labels[j])]) for j in range(k)]
        total = sum(unfolded)
        for j in range(k):
            q_hat[i, j] = unfolded[j] / total
    return p_hat, q_hat


@pytest.mark.parametrize("b,c,k,present", [(1, 3, 5, 3), (4, 10, 40, 10), (7, 20, 13, 6), (3, 100, 64, 17)])
def test_matches_loop(b, c, k, present):
    g = torch.Generator().manual_seed(b * 1000 + c + k)
    p_w = torch.softmax(torch.randn(b, c, generator=g) * 3, 1)
    q_w = torch.softmax(torch.randn(b, k, generator=g) * 3, 1)
    # only `present` classes appear in the bank: the others must get no aggregated mass
    bank_labels = torch.randint(0, present, (k,), generator=g)
    p_hat, q_hat = pseudo_labels(p_w, q_w, bank_labels, 0.9)
    ref_p, ref_q = loop_reference(p_w, q_w, bank_labels, 0.9)
    torch.testing.assert_close(p_hat.double(), ref_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q_hat.double(), ref_q, rtol=1e-5, atol=1e-6)
    missing = [cls for cls in range(c) if cls not in set(bank_labels.tolist())]
    for cls in missing:
        torch.testing.assert_close(p_hat[:, cls], 0.9 * p_w[:, cls])
    torch.testing.assert_close(p_hat.sum(1), torch.ones(b))
    torch.testing.assert_close(q_hat.sum(1), torch.ones(b))


def test_alpha_one_keeps_class_prediction():
    p_w = torch.tensor([[0.2, 0.8]])
    q_w = torch.tensor([[0.5, 0.25, 0.25]])
    labels = torch.tensor([0, 1, 1])
    p_hat, q_hat = pseudo_labels(p_w, q_w, labels, 1.0)
    torch.testing.assert_close(p_hat, p_w)
    # unfold: [0.5*0.2, 0.25*0.8, 0.25*0.8] = [0.1, 0.2, 0.2] -> /0.5
    torch.testing.assert_close(q_hat, torch.tensor([[0.2, 0.4, 0.4]]))
