"""D2Pruner-style: debiased importance + structural diversity (METHODS.md, D2Pruner-style; AAAI'26).

Pre-LLM port: the paper reads the LLM layer-1 attention of the last text token; here importance is
the encoder's `attn`, debiased by a per-model positional prior `bias` (the mean `attn` over
calibration images). Without a prior there is no debiasing (I = attn, the ordering a uniform prior
gives). Where METHODS.md is silent we choose, as said in the comments below: min-max over the whole
[N, N] similarity matrix of each batch row, no self edges, P = floor(pivot_ratio * K) in exact
decimal arithmetic. The greedy loop is unrolled for the static K - P, so the graph has no Loop.
"""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from edgeprune.errors import PrunerConfigError
from edgeprune.pruners._registry import register_pruner
from edgeprune.pruners.base import Pruner, Selection
from edgeprune.pruners.ops import NEG_INF, argmax, cosine_matrix, gather_rows, one_hot, sort_by_position, topk_indices

__all__ = ["D2Pruner", "load_prior", "prior_on_grid", "diverse_select", "count_pivots", "check_options"]

EPS = 1e-7  # METHODS.md: I = attn / (bias + 1e-7)


def load_prior(bias) -> Tensor | None:
    """The positional prior [N'] from a tensor, array, list or a .npy file of `edgeprune calibrate`."""
    if bias is None:
        return None
    if isinstance(bias, (str, Path)) and str(bias).endswith(".npy"):  # written by `edgeprune calibrate`
        try:
            bias = np.load(bias)
        except (OSError, ValueError) as err:
            raise PrunerConfigError(f"d2pruner: bias file {str(bias)!r} cannot be read ({err})") from None
    if not isinstance(bias, (Tensor, np.ndarray, list, tuple)):
        raise PrunerConfigError(f"d2pruner: bias is a {type(bias).__name__}, expected a 1-D tensor, array, list "
                                "or a .npy file from `edgeprune calibrate`")
    try:
        values = bias.detach().cpu() if isinstance(bias, Tensor) else bias
        prior = torch.as_tensor(np.asarray(values, dtype=np.float32))
    except (TypeError, ValueError) as err:
        raise PrunerConfigError(f"d2pruner: bias cannot be read as numbers ({err}), expected a 1-D prior") from None
    if prior.dim() != 1 or prior.numel() == 0:
        raise PrunerConfigError(f"d2pruner: bias has shape {tuple(prior.shape)}, expected a non-empty 1-D prior [N']")
    if not bool(torch.isfinite(prior).all()) or bool((prior < 0).any()):
        raise PrunerConfigError("d2pruner: bias has negative or non-finite values, expected a mean attention >= 0")
    return prior


def prior_on_grid(prior: Tensor, grid: tuple[int, int]) -> Tensor:
    """bias + 1e-7 on the grid (H, W) [H*W], as a plain constant: a prior of another size is resized
    bilinearly (METHODS.md step 1). Through a Python list, so a traced graph holds one constant
    rather than Resize/Add nodes."""
    h, w = grid
    if prior.numel() != h * w:
        side = math.isqrt(prior.numel())
        if side * side != prior.numel():
            raise PrunerConfigError(f"d2pruner: bias has N'={prior.numel()} values, expected N={h * w} "
                                    f"or a square prior grid to resize to {h}x{w}")
        prior = F.interpolate(prior.view(1, 1, side, side), size=(h, w), mode="bilinear",
                              align_corners=False).reshape(-1)
    return torch.tensor((prior + EPS).tolist(), dtype=torch.float32)


def count_pivots(pivot_ratio: float, keep: int) -> int:
    """floor(pivot_ratio * K) in exact decimal arithmetic: Fraction(str(.)) reads 0.7 as exactly 7/10
    (float 0.7 * 90 floors to 62, not 63)."""
    return math.floor(Fraction(str(pivot_ratio)) * keep)


def check_options(method: str, alpha, theta, pivot_ratio) -> None:
    for option, value in (("alpha", alpha), ("theta", theta), ("pivot_ratio", pivot_ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PrunerConfigError(f"{method}: {option}={value!r}, expected a finite number")
    if not 0.0 <= alpha <= 1.0:
        raise PrunerConfigError(f"{method}: alpha={alpha!r}, expected 0 <= alpha <= 1")
    if not 0.0 < pivot_ratio <= 1.0:   # 0: no pivots, not the method (METHODS.md: P = floor(0.7 K) pivots)
        raise PrunerConfigError(f"{method}: pivot_ratio={pivot_ratio!r}, expected 0 < pivot_ratio <= 1")
    if not 0.0 <= theta <= 1.0:        # S lies in [0, 1]: theta = 1 already makes no edge, < 0 joins every pair
        raise PrunerConfigError(f"{method}: theta={theta!r}, expected 0 <= theta <= 1 (edges where S > theta, "
                                "S in [0, 1])")


def diverse_select(tokens: Tensor, importance: Tensor, rows: Tensor, cols: Tensor, *, keep: int, num_pivots: int,
                   alpha: float, theta: float) -> Tensor:
    """Steps 2-4 of METHODS.md D2Pruner (shared with the in-LLM original, METHODS_INLLM.md §4):
    tokens [B, N, D], importance [B, N], grid rows/cols [N] or [B, N] of each token -> chosen [B, K]
    (pivots first, then the greedy picks; not sorted)."""
    b, n = tokens.shape[0], tokens.shape[1]  # traced sizes: aranges stay Range ops, not N x N constants
    masked = torch.tensor(NEG_INF, dtype=importance.dtype, device=importance.device)

    # 2. graph: S = alpha * minmax(cos) + (1 - alpha) * A8, edge where S > theta. Min-max runs over
    # the whole [N, N] matrix of each batch row, diagonal included. A token is not its own
    # neighbour, but the diagonal is left unmasked on purpose: a token's own entry could only
    # remove it from the available set, which its selection does anyway, so masking it would
    # cost N x N ops for the same result (the A8 term likewise keeps Chebyshev distance 0).
    score = 0.0
    if alpha > 0.0:
        cos = cosine_matrix(tokens)                                   # [B, N, N]
        lo = cos.amin(dim=(1, 2), keepdim=True)                       # [B, 1, 1]
        hi = cos.amax(dim=(1, 2), keepdim=True)
        minmax = (cos - lo) / (hi - lo).clamp_min(1e-12)              # [B, N, N] in [0, 1]
        score = minmax if alpha == 1.0 else alpha * minmax
    if alpha < 1.0:  # A8: Chebyshev distance 1 on the grid, from the coordinates (no N x N constant)
        near = ((rows.unsqueeze(-1) - rows.unsqueeze(-2)).abs() <= 1) & \
            ((cols.unsqueeze(-1) - cols.unsqueeze(-2)).abs() <= 1)   # [N, N] or [B, N, N]
        score = score + (1.0 - alpha) * near.to(tokens.dtype)
    edges = (score > theta).expand(b, n, n)                           # [B, N, N]

    # 3. pivots: the P most important tokens; every neighbour of a pivot becomes unavailable
    if num_pivots > 0:
        pivots = topk_indices(importance, num_pivots)                 # [B, P]
        selected = one_hot(pivots, n)                                 # [B, N]
        available = ~(selected | gather_rows(edges, pivots).any(dim=1))  # [B, N]
        chosen = [pivots]
    else:  # K = 1 at the default ratio: no pivots, every token available
        selected = torch.zeros_like(importance, dtype=torch.bool)
        available = ~selected
        chosen = []
    unselected = torch.where(selected, masked, importance)            # [B, N], for the fallback

    # 4. K - P greedy steps: the most important available token, then its neighbours leave the
    # available set; when nothing is available, the most important unselected token.
    flat = edges.reshape(-1, n)                                       # [B*N, N]: one Gather per step
    row_offset = torch.arange(b, device=tokens.device) * n           # [B]
    ar_row = torch.arange(n, device=tokens.device).unsqueeze(0)      # [1, N]
    for _ in range(keep - num_pivots):
        fallback = torch.where(available.any(dim=1, keepdim=True), masked, unselected)
        pick = argmax(torch.where(available, importance, fallback))  # [B], ties to the lowest index
        is_pick = ar_row == pick.unsqueeze(1)                         # [B, N]
        unselected = torch.where(is_pick, masked, unselected)
        available = available & ~(is_pick | flat.index_select(0, pick + row_offset))
        chosen.append(pick.unsqueeze(1))
    return torch.cat(chosen, dim=1)                                   # [B, K]


@register_pruner("d2pruner")
class D2Pruner(Pruner):
    """D2Pruner: debiased-importance pivots, then greedy picks that skip graph neighbours."""

    requires = ("tokens", "attn", "grid")

    def __init__(self, keep: int, bias=None, alpha: float = 1.0, theta: float = 0.8, pivot_ratio: float = 0.7):
        super().__init__(keep)
        check_options("d2pruner", alpha, theta, pivot_ratio)
        self.alpha, self.theta, self.pivot_ratio = float(alpha), float(theta), float(pivot_ratio)
        self.num_pivots = count_pivots(self.pivot_ratio, keep)
        self.register_buffer("bias", load_prior(bias))

    def select(self, tokens: Tensor, attn: Tensor, grid: tuple[int, int]) -> Selection:  # [B, N, D], [B, N]
        # 1. debiased importance; no prior = uniform prior = plain attn ordering
        importance = attn if self.bias is None else attn / prior_on_grid(self.bias, grid).to(attn)  # [B, N]
        ar = torch.arange(tokens.shape[1], device=tokens.device)      # [N] cell index -> (row, col)
        chosen = diverse_select(tokens, importance, ar // grid[1], ar % grid[1], keep=self.keep,
                                num_pivots=self.num_pivots, alpha=self.alpha, theta=self.theta)  # [B, K]
        positions, kept = sort_by_position(chosen, gather_rows(tokens, chosen))
        return Selection(tokens=kept, positions=positions)            # [B, K, D], [B, K] ascending

    def extra_repr(self) -> str:
        prior = "none" if self.bias is None else f"[{self.bias.numel()}]"
        return (f"keep={self.keep}, bias={prior}, alpha={self.alpha}, theta={self.theta}, "
                f"pivot_ratio={self.pivot_ratio}")
