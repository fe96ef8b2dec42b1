"""VP noise gate (METHODS.md, AutoSelect, step 3)."""
from __future__ import annotations

import pytest
import torch

from edgeprune.train.noise_gate import vp_gate


@pytest.mark.parametrize("a", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_preserves_unit_variance(a):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2000, 32, generator=g)                       # unit variance, 256k samples
    out = vp_gate(x, torch.full((4, 2000), a), generator=g)
    # std of a sample variance of 256k N(0,1) draws is ~0.003: 0.02 is a 7-sigma band
    assert abs(float(out.var()) - 1.0) < 0.02
    assert abs(float(out.mean())) < 0.01


def test_variance_not_preserved_by_a_linear_gate():
    """Control: alpha * x + (1 - alpha) * eps loses variance at alpha = 0.5, so the test above can fail."""
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4000, 32, generator=g), torch.randn(2, 4000, 32, generator=g)
    assert float((0.5 * x + 0.5 * eps).var()) < 0.6
    assert abs(float(vp_gate(x, torch.full((2, 4000), 0.5), noise=eps).var()) - 1.0) < 0.02


def test_alpha_one_is_the_input_and_alpha_zero_the_noise():
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(2, 5, 3, generator=g) * 7, torch.randn(2, 5, 3, generator=g)
    assert torch.equal(vp_gate(x, torch.ones(2, 5), noise=eps), x)
    assert torch.equal(vp_gate(x, torch.zeros(2, 5), noise=eps), eps)
    alpha = torch.tensor([[1.0, 0.0, 0.25, 1.0, 0.5]] * 2)
    out = vp_gate(x, alpha, noise=eps)
    torch.testing.assert_close(out[:, 2], 0.5 * x[:, 2] + 0.75 ** 0.5 * eps[:, 2])
    assert torch.equal(out[:, [0, 3]], x[:, [0, 3]])


def test_gradient_finite_at_the_ends():
    x, eps = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    alpha = torch.tensor([[1.0, 0.0, 0.5]], requires_grad=True)
    vp_gate(x, alpha, noise=eps).sum().backward()
    assert torch.isfinite(alpha.grad).all() and float(alpha.grad[0, 2].abs()) > 0


def test_seeded_noise_is_reproducible():
    x, alpha = torch.randn(1, 4, 2), torch.full((1, 4), 0.3)
    a = vp_gate(x, alpha, generator=torch.Generator().manual_seed(5))
    b = vp_gate(x, alpha, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
