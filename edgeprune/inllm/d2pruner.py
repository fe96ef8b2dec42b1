"""D2Pruner at layer L (the in-LLM original): debiased last-token attention + semantic/spatial graph
(METHODS_INLLM.md §4).

The METHODS.md pre-LLM port step for step (pruners/d2pruner.py: `diverse_select`), on other signals:
`attn` -> A_ori = A^(L-1)[last, image slots], `tokens` -> h^(L-1) of the image slots (P4: raw; option
`features="final_norm"` as DART). The prior `bias` [N] is the mean A_ori over calibration images at
the same L (`edgeprune calibrate --llm-layer L`); it is indexed by each slot's original grid
position, so it stays right after a pre-LLM pruner, and resized bilinearly from another grid size.
Without it A_bias is uniform: FastV + structural diversity. Spatial adjacency (alpha < 1) uses the
slots' original (row, col) on the grid (P6).
"""
from __future__ import annotations

from edgeprune.errors import PrunerConfigError
from edgeprune.inllm._registry import register_stage
from edgeprune.inllm.base import LLMStage, Stage, StageChoice, StageSignals
from edgeprune.pruners.d2pruner import check_options, count_pivots, diverse_select, load_prior, prior_on_grid

__all__ = ["D2Pruner"]

FEATURES = ("raw", "final_norm")


@register_stage("d2pruner")
class D2Pruner(LLMStage):
    """D2Pruner: debiased layer L-1 last-token attention pivots, then greedy picks that skip graph neighbours."""

    requires = ("hidden", "last_attn", "positions")
    default_layers = (2,)

    def __init__(self, keep=None, layer=None, bias=None, alpha: float = 1.0, theta: float = 0.8,
                 pivot_ratio: float = 0.7, features: str = "raw"):
        super().__init__(keep, layer)
        check_options("d2pruner", alpha, theta, pivot_ratio)
        if features not in FEATURES:
            raise PrunerConfigError(f"d2pruner: features={features!r}, expected one of {', '.join(FEATURES)}")
        self.alpha, self.theta, self.pivot_ratio, self.features = float(alpha), float(theta), float(pivot_ratio), \
            features
        self.register_buffer("bias", load_prior(bias))

    def select(self, signals: StageSignals, stage: Stage) -> StageChoice:
        k2, positions = stage.num_out, signals.positions                   # [B, n] grid index of each slot
        # 1.-2. A_rel = A_ori / (A_bias + eps), the prior read at each slot's original position
        importance = signals.last_attn                                     # [B, n]
        if self.bias is not None:
            importance = importance / prior_on_grid(self.bias, signals.grid)[positions]
        tokens = signals.image_hidden                                      # [B, n, D]
        if self.features == "final_norm":
            tokens = signals.final_norm(tokens).float()
        # 3.-8. graph, pivots, greedy picks: the pre-LLM port's own code
        w = signals.grid[1]
        chosen = diverse_select(tokens, importance, positions // w, positions % w, keep=k2,
                                num_pivots=count_pivots(self.pivot_ratio, k2), alpha=self.alpha, theta=self.theta)
        return StageChoice(keep=chosen)                                    # [B, K2]

    def extra_repr(self) -> str:
        prior = "none" if self.bias is None else f"[{self.bias.numel()}]"
        return (f"{super().extra_repr()}, bias={prior}, alpha={self.alpha}, theta={self.theta}, "
                f"pivot_ratio={self.pivot_ratio}, features={self.features}")
