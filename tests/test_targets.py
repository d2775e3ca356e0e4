"""What a cache stores (top-k, tail, attention maps) and what it implies, against float64."""

import math

import numpy as np
import pytest
import torch

from kdcache.core.topk import (
    attention_map,
    dense_logits,
    implied_log_probs,
    tail_bin_logit,
    tail_share,
    topk_mass,
    topk_targets,
)
from kdcache.kernels.reference import topk_kl_reference
from kdcache.store.schema import index_dtype


def test_index_dtype_is_the_smallest_that_holds_the_ids():
    assert index_dtype(2) == np.uint8 and index_dtype(256) == np.uint8
    assert index_dtype(257) == np.uint16 and index_dtype(65536) == np.uint16
    assert index_dtype(65537) == np.uint32


@pytest.mark.parametrize("k", [1, 3, 10])
def test_topk_and_tail_against_float64(k):
    torch.manual_seed(0)
    logits = torch.randn(2, 11, 5, 7) * 6
    v, i, tail = topk_targets(logits, k)
    ref = logits.double()
    assert torch.equal(i, ref.topk(k, 1).indices)
    assert torch.allclose(v.double(), ref.topk(k, 1).values)
    outside = torch.ones_like(ref, dtype=torch.bool).scatter(1, i, False)
    want = torch.log(torch.where(outside, ref.exp(), torch.zeros_like(ref)).sum(1))
    assert torch.allclose(tail.double(), want, atol=1e-5)
    # the tail stays accurate when the top k hold nearly all the mass (no cancellation)
    peaked = torch.zeros(1, 11, 1, 1)
    peaked[0, 0] = 60.0
    _, _, t = topk_targets(peaked, 1)
    assert torch.allclose(t, torch.tensor(math.log(10.0)))
    assert topk_targets(logits, 11)[2] is None
    with pytest.raises(ValueError):
        topk_targets(logits, 12)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_implied_distribution(T):
    torch.manual_seed(1)
    logits = torch.randn(3, 9, 4, 4).double() * 3
    v, i, tail = topk_targets(logits, 3)
    logp = implied_log_probs(v, i, tail, 9, T, "bin")
    assert torch.allclose(logp.exp().sum(1), torch.ones(3, 4, 4, dtype=torch.float64))
    # the top-k classes keep their teacher logits' ratios
    exact = torch.log_softmax(logits / T, 1)
    lk = logp.gather(1, i)
    assert torch.allclose(lk - lk[:, :1], exact.gather(1, i) - exact.gather(1, i)[:, :1])
    if T == 1.0:  # at T = 1 the tail bin holds exactly the teacher's tail mass
        assert torch.allclose(lk.exp().sum(1), exact.exp().gather(1, i).sum(1))
    ren = implied_log_probs(v, i, tail, 9, T, "renormalize")
    assert torch.allclose(ren.exp().sum(1), torch.ones(3, 4, 4, dtype=torch.float64))
    assert torch.isinf(ren).sum() == 3 * 6 * 16


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_what_a_top_k_cache_implies_has_one_definition(T):
    """The equal tail shares, the tail bin, the dense rebuild and the top-k mass, each against a
    float64 computation written out here from the loss contract, and against each other."""
    torch.manual_seed(2)
    C, k = 9, 3
    logits = torch.randn(2, C, 3, 5).double() * 3
    v, i, tail = (t.double() if t.is_floating_point() else t for t in topk_targets(logits, k))
    # C - k equal shares of the tail: their logsumexp is the tail
    share = tail_share(tail, C, k)
    assert torch.allclose(torch.logsumexp(share.unsqueeze(1).expand(-1, C - k, -1, -1), 1), tail)
    assert np.allclose(tail_share(tail.numpy(), C, k), share.numpy())  # numpy arrays alike
    # the tail bin at T: log(C - k) + (tail - log(C - k)) / T
    assert torch.allclose(tail_bin_logit(tail, C, k, T), math.log(C - k) + (tail - math.log(C - k)) / T)
    # the dense rebuild: top k at their ids, every other class at the share; at T = 1 the bin policy
    dense = dense_logits(v, i, tail, C).double()
    assert torch.allclose(dense.gather(1, i), v, atol=1e-5)
    others = torch.ones_like(dense, dtype=torch.bool).scatter(1, i, False)
    assert torch.allclose(dense[others], share.unsqueeze(1).expand_as(dense)[others].double(), atol=1e-5)
    assert torch.allclose(torch.log_softmax(dense, 1), implied_log_probs(v, i, tail, C, 1.0, "bin"), atol=1e-5)
    # the mass the top k hold: the implied distribution's, and by hand at one position
    mass = topk_mass(v[0].numpy(), tail[0].numpy(), C, T)
    implied = implied_log_probs(v, i, tail, C, T, "bin").exp().gather(1, i).sum(1)
    assert np.allclose(mass, implied[0].numpy())
    a = [float(x) / T for x in v[0, :, 1, 2]] + [math.log(C - k) + (float(tail[0, 1, 2]) - math.log(C - k)) / T]
    assert math.isclose(mass[1, 2], sum(math.exp(x) for x in a[:k]) / sum(math.exp(x) for x in a), rel_tol=1e-12)
    assert np.array_equal(topk_mass(v[0].numpy(), None, C, T), np.ones((3, 5)))
    # a dense cache: every class its own logit, none absent
    dv, di, _ = topk_targets(logits, C)
    assert torch.allclose(dense_logits(dv, di, None, C).double(), logits, atol=1e-5)


def test_attention_map_is_the_normalised_channel_energy():
    f = torch.randn(2, 5, 3, 4)
    a = attention_map(f)
    q = (f.double() ** 2).sum(1).flatten(1)
    want = (q / q.norm(dim=1, keepdim=True)).view(2, 3, 4)
    assert torch.allclose(a.double(), want, atol=1e-6)
    assert torch.allclose(a.flatten(1).norm(dim=1), torch.ones(2))


def test_reference_loss_dense_equals_kl_div_and_bin_gradient_matches_the_closed_form():
    torch.manual_seed(2)
    s = torch.randn(2, 7, 3, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 7, 3, 3, dtype=torch.float64) * 2
    T = 2.0
    v, i, _ = topk_targets(t, 7)
    loss = topk_kl_reference(s, v.double(), i, None, temperature=T, reduction="mean")
    p = torch.softmax(t / T, 1)
    kl = (p * (torch.log_softmax(t / T, 1) - torch.log_softmax(s / T, 1))).sum(1)
    assert torch.allclose(loss, T * T * kl.mean())
    # bin policy: d/ds = T (q - p) inside the top k, T q (1 - p_tail / q_tail) outside
    v, i, tail = topk_targets(t, 3)
    loss = topk_kl_reference(s, v.double(), i, tail.double(), temperature=T, reduction="sum")
    (g,) = torch.autograd.grad(loss, s)
    q = torch.softmax(s / T, 1).detach()
    log_rest = math.log(4)
    a = torch.cat([v / T, (log_rest + (tail - log_rest) / T).unsqueeze(1)], 1)
    pb = torch.softmax(a, 1)
    inside = torch.zeros_like(q, dtype=torch.bool).scatter(1, i, True)
    q_tail = (q * ~inside).sum(1, keepdim=True)
    want = T * q * (1 - pb[:, 3:] / q_tail)
    want = want.scatter(1, i, T * (q.gather(1, i) - pb[:, :3]))
    assert torch.allclose(g, want)
