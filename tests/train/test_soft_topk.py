"""Soft top-K (METHODS.md, AutoSelect, steps 1-2): sum to K, hard limit, gradients."""
from __future__ import annotations

import pytest
import torch

from edgeprune.errors import PrunerConfigError
from edgeprune.pruners.ops import one_hot, topk_indices
from edgeprune.train.soft_topk import soft_topk, zscore


def test_zscore_rows_have_mean_0_std_1():
    s = torch.tensor([[1.0, 2.0, 3.0, 6.0], [10.0, 10.0, 10.0, 30.0]])
    z = zscore(s)
    torch.testing.assert_close(z.mean(-1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(z.std(-1, unbiased=False), torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(z[1], torch.tensor([-1 / 3 ** 0.5] * 3 + [3 ** 0.5]), atol=1e-5, rtol=0)
    assert torch.isfinite(zscore(torch.ones(1, 5))).all()  # constant row: no division by zero


@pytest.mark.parametrize("n,keep", [(16, 1), (16, 5), (576, 64), (2880, 64), (100, 99)])
@pytest.mark.parametrize("tau", [1.0, 0.3, 0.05, 0.01])
def test_rows_sum_to_keep(n, keep, tau):
    g = torch.Generator().manual_seed(n + keep)
    s = zscore(torch.randn(3, n, generator=g) * 3)
    alpha = soft_topk(s, keep, tau)
    assert alpha.shape == s.shape and alpha.dtype == s.dtype
    assert float((alpha.sum(-1) - keep).abs().max()) < 1e-4
    assert bool(((alpha >= 0) & (alpha <= 1)).all())


def test_sum_to_keep_with_ties_and_outliers():
    s = torch.tensor([[0.0, 0.0, 0.0, 0.0, 5.0, -5.0, 0.0, 0.0],
                      [1e3, -1e3, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])
    alpha = soft_topk(s, 3, 0.05)
    assert float((alpha.sum(-1) - 3).abs().max()) < 1e-4
    # row 0: the outlier is kept, the six tied zeros share the remaining 2 equally
    torch.testing.assert_close(alpha[0, 4], torch.tensor(1.0))
    torch.testing.assert_close(alpha[0, [0, 1, 2, 3, 6, 7]], torch.full((6,), 2 / 6), atol=1e-5, rtol=0)


def test_hard_topk_in_the_limit():
    s = torch.tensor([[0.3, -1.2, 2.0, 0.9, 0.1, 1.5, -0.4, 0.8]])
    alpha = soft_topk(s, 3, 1e-3)
    # hand-picked: the three largest are indices 2 (2.0), 5 (1.5), 3 (0.9)
    expected = torch.tensor([[0, 0, 1, 1, 0, 1, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(alpha, expected, atol=1e-6, rtol=0)
    # at tau = 1 the same row is far from hard: the limit is a property of tau, not of the input
    assert float((soft_topk(s, 3, 1.0) - expected).abs().max()) > 0.2


def test_converges_to_hard_topk_as_tau_shrinks():
    g = torch.Generator().manual_seed(0)
    s = zscore(torch.randn(4, 200, generator=g))
    hard = one_hot(topk_indices(s, 20), 200).float()
    errors = [float((soft_topk(s, 20, tau) - hard).abs().max()) for tau in (1.0, 0.1, 0.01, 1e-4)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3, errors


def test_gradients_finite_and_nonzero():
    g = torch.Generator().manual_seed(1)
    raw = torch.randn(2, 64, generator=g, requires_grad=True)
    weights = torch.randn(2, 64, generator=g)
    for tau in (1.0, 0.05):
        raw.grad = None
        (soft_topk(zscore(raw), 8, tau) * weights).sum().backward()
        assert torch.isfinite(raw.grad).all()
        assert float(raw.grad.abs().max()) > 1e-4
    # saturated sigmoids (huge gaps at tiny tau): still finite
    s = torch.tensor([[10.0, 0.0, -10.0, 5.0]], requires_grad=True)
    soft_topk(s, 2, 1e-4).sum().backward()
    assert torch.isfinite(s.grad).all()


def test_gradient_is_the_implicit_function_gradient():
    """Against finite differences of the exact solution (float64): the Newton re-attachment is exact."""
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 12, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: soft_topk(x, 4, 0.5), (s,), eps=1e-6, atol=1e-6)
    # the sum is constant in s, so its gradient vanishes
    soft_topk(s, 4, 0.5).sum().backward()
    assert float(s.grad.abs().max()) < 1e-9


def test_keep_equals_n_and_bad_arguments():
    s = torch.randn(2, 6)
    torch.testing.assert_close(soft_topk(s, 6, 0.5), torch.ones(2, 6))
    with pytest.raises(PrunerConfigError, match="keep=7, expected 1 <= keep <= N=6"):
        soft_topk(s, 7, 0.5)
    with pytest.raises(PrunerConfigError, match="keep=0"):
        soft_topk(s, 0, 0.5)
    with pytest.raises(PrunerConfigError, match="tau=0"):
        soft_topk(s, 2, 0.0)
    with pytest.raises(PrunerConfigError, match=r"shape \(6,\)"):
        soft_topk(s[0], 2, 0.5)
