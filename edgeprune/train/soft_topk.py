"""Soft top-K of AutoSelect training (METHODS.md, AutoSelect, steps 1-2).

alpha_i = sigmoid((s_hat_i - lambda) / tau), with lambda solved per row so that sum_i alpha_i = K.

How lambda is made differentiable (the spec leaves the choice open): bisection under no_grad finds
lambda* to float64 resolution, then lambda is re-attached to the graph by a zero-valued Newton term

    lambda = lambda* + tau * (sum_i sigma_i - stopgrad(sum_i sigma_i)) / stopgrad(sum_i sigma_i (1 - sigma_i))

with sigma_i = sigmoid((s_i - lambda*) / tau). Its value is lambda* exactly; its gradient is the
implicit-function one, d lambda / d s_j = sigma'_j / sum_i sigma'_i (a Newton step from the root has
exactly this derivative). This costs O(N) per row instead of back-propagating through every bisection
step, is exact however many steps the bisection took, and is bounded (|d lambda / d s_j| <= 1) even
where the sigmoids saturate at small tau.
"""
from __future__ import annotations

import torch
from torch import Tensor

from edgeprune.errors import PrunerConfigError

__all__ = ["zscore", "soft_topk", "BISECTION_STEPS"]

# Halving a bracket of width ~ (max - min + 80 tau) 64 times reaches float64 resolution.
BISECTION_STEPS = 64
# The bracket: at lambda = min - 40 tau every alpha > 1 - 4e-18 (sum = N >= K); at max + 40 tau every
# alpha < 4e-18 (sum ~ 0 <= K).
_BRACKET = 40.0


def zscore(scores: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-row standardisation (step 1): (s - mean) / std, so tau has the same meaning for any scorer
    scale. Population std (the row is the whole population); eps keeps a constant row finite. [B, N]"""
    mean = scores.mean(dim=-1, keepdim=True)
    std = scores.std(dim=-1, keepdim=True, unbiased=False)
    return (scores - mean) / (std + eps)


def soft_topk(scores: Tensor, keep: int, tau: float) -> Tensor:
    """scores [B, N] (already z-scored) -> alpha [B, N] in (0, 1) with each row summing to `keep`.

    As tau -> 0, alpha -> the hard top-K mask (ties share their mass). keep == N gives all ones.
    Computed in float64 (the sum-to-K residual then stays far below 1e-4 at N in the thousands), returned
    in the dtype of `scores`.
    """
    if scores.dim() != 2:
        raise PrunerConfigError(f"soft_topk: scores of shape {tuple(scores.shape)}, expected [B, N]")
    n = scores.shape[-1]
    if not (1 <= keep <= n):
        raise PrunerConfigError(f"soft_topk: keep={keep}, expected 1 <= keep <= N={n}")
    if not tau > 0:
        raise PrunerConfigError(f"soft_topk: tau={tau}, expected > 0")
    if keep == n:  # lambda = -inf: every token kept, no gradient to give
        return torch.ones_like(scores)
    s = scores.double()
    with torch.no_grad():
        lo = s.min(dim=-1, keepdim=True).values - _BRACKET * tau     # sum(alpha) = N >= K here
        hi = s.max(dim=-1, keepdim=True).values + _BRACKET * tau     # sum(alpha) ~ 0 <= K here
        for _ in range(BISECTION_STEPS):
            mid = (lo + hi) / 2
            too_many = torch.sigmoid((s - mid) / tau).sum(dim=-1, keepdim=True) > keep
            lo = torch.where(too_many, mid, lo)                       # threshold must rise
            hi = torch.where(too_many, hi, mid)
        lam_star = (lo + hi) / 2                                      # [B, 1]
    # Re-attach lambda to the graph: value lambda*, gradient of the implicit function sum(alpha) = K.
    sig = torch.sigmoid((s - lam_star) / tau)                         # [B, N]
    total = sig.sum(dim=-1, keepdim=True)                             # [B, 1]
    slope = (sig * (1 - sig)).sum(dim=-1, keepdim=True).detach().clamp_min(1e-300)  # tau |d sum / d lambda|
    lam = lam_star + tau * (total - total.detach()) / slope           # [B, 1]
    alpha = torch.sigmoid((s - lam) / tau)                            # [B, N]
    return alpha.to(scores.dtype)
