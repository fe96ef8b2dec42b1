"""Diagonal-attention Denoiser (METHODS.md, AutoSelect, step 4)."""
from __future__ import annotations

import pytest
import torch

from edgeprune.errors import PrunerConfigError
from edgeprune.train.denoiser import Denoiser, diagonal_mask


def randomised(dim=8, heads=2, seed=0) -> Denoiser:
    """A Denoiser with every weight random (the zero-initialised output layers would hide mixing)."""
    torch.manual_seed(seed)
    d = Denoiser(dim, heads=heads)
    with torch.no_grad():
        for p in d.parameters():
            p.normal_(0, 0.5)
    return d.eval().requires_grad_(False)


def test_mask_is_identity_from_arange():
    m = diagonal_mask(4)
    assert m.shape == (4, 4)
    assert torch.equal(m.diagonal(), torch.zeros(4))
    off = m[~torch.eye(4).bool()]
    assert bool((off < -1e29).all()) and bool(torch.isfinite(m).all())


@pytest.mark.parametrize("j", [0, 3, 6])
def test_token_wise(j):
    d = randomised()
    x = torch.randn(2, 7, 8)
    y = x.clone()
    y[:, j] = torch.randn(2, 8) * 5
    out_x, out_y = d(x), d(y)
    others = [i for i in range(7) if i != j]
    torch.testing.assert_close(out_x[:, others], out_y[:, others], atol=1e-6, rtol=0)
    assert float((out_x[:, j] - out_y[:, j]).abs().max()) > 1e-2   # token j itself does change


def test_token_wise_equals_one_token_at_a_time():
    d = randomised(seed=1)
    x = torch.randn(1, 5, 8)
    alone = torch.cat([d(x[:, i:i + 1]) for i in range(5)], dim=1)
    torch.testing.assert_close(d(x), alone, atol=1e-6, rtol=0)


def test_without_the_mask_tokens_would_mix():
    """Control: the same block with full attention is not token-wise, so the test above can fail."""
    d = randomised()
    x = torch.randn(1, 7, 8)
    y = x.clone()
    y[:, 3] = torch.randn(1, 8) * 5   # a new token (a constant shift would vanish in the LayerNorm)
    h_x, h_y = d.norm1(x), d.norm1(y)
    full_x = d.attn(h_x, h_x, h_x, need_weights=False)[0]
    full_y = d.attn(h_y, h_y, h_y, need_weights=False)[0]
    assert float((full_x[:, 0] - full_y[:, 0]).abs().max()) > 1e-3


def test_identity_at_initialisation_and_trainable():
    d = Denoiser(8, heads=2)
    x = torch.randn(2, 5, 8)
    assert torch.equal(d(x), x)
    d(x).pow(2).sum().backward()
    assert float(d.mlp[2].weight.grad.abs().max()) > 0 and float(d.attn.out_proj.weight.grad.abs().max()) > 0


def test_bad_heads():
    with pytest.raises(PrunerConfigError, match="dim=10, heads=4"):
        Denoiser(10, heads=4)
