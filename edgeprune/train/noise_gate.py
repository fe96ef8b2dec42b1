"""Variance-preserving noise gate of AutoSelect training (METHODS.md, AutoSelect, step 3).

    x_tilde_i = sqrt(alpha_i) * x_i + sqrt(1 - alpha_i) * eps_i,   eps ~ N(0, I)

For unit-variance x independent of eps the output has unit variance for every alpha, so the frozen
model sees tokens of the usual scale and can only tell a "dropped" token by its lost content.
eps is N(0, I) as the spec says, whatever the scale of x (the encoder features are not normalised
first: the spec does not ask for it, and the gate needs no learned scale to push the Scorer).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["vp_gate"]

# Below this, sqrt's derivative 1 / (2 sqrt(v)) would blow up; the term is then exactly 0.
_SQRT_FLOOR = 1e-12


def _safe_sqrt(v: Tensor) -> Tensor:
    """sqrt(v) for v in [0, 1] with a finite gradient at 0 (v <= floor gives exactly 0, gradient 0)."""
    return torch.where(v > _SQRT_FLOOR, v.clamp_min(_SQRT_FLOOR).sqrt(), torch.zeros_like(v))


def vp_gate(x: Tensor, alpha: Tensor, noise: Tensor | None = None,
            generator: torch.Generator | None = None) -> Tensor:
    """x [B, N, C], alpha [B, N] in [0, 1] -> x_tilde [B, N, C].

    `noise` (same shape as x) is drawn from N(0, I) with `generator` when not given. At alpha = 1 the
    output is x exactly, at alpha = 0 it is the noise exactly.
    """
    if noise is None:  # drawn where the generator lives (a CPU generator also serves a CUDA run)
        where = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=where).to(x.device)
    a = alpha.clamp(0.0, 1.0).unsqueeze(-1)                           # [B, N, 1]
    return _safe_sqrt(a) * x + _safe_sqrt(1.0 - a) * noise           # [B, N, C]
