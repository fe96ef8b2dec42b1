"""PyramidDrop: last-token attention top-n at layers 8, 16, 24 with n_s = round(K * 0.5^s)
(METHODS_INLLM.md §6; README of Cooperx521/PyramidDrop: ratios 1.0/0.5/0.25/0.125).

At each stage the score is A^(L-1)[last, current image tokens] (the last token, as FastV: F2); the
counts are relative to the K tokens entering the LLM (layer average 270 for K = 576, T = 32).
"""
from __future__ import annotations

import math

from edgeprune.errors import PrunerConfigError
from edgeprune.inllm._registry import register_stage
from edgeprune.inllm.base import LLMStage, Stage, StageChoice, StageSignals, half_up
from edgeprune.pruners.ops import topk_indices

__all__ = ["PyramidDrop"]


@register_stage("pdrop")
class PyramidDrop(LLMStage):
    """PyramidDrop: last-token attention ranking at several layers, a geometric pyramid of counts."""

    requires = ("last_attn",)
    default_layers = (8, 16, 24)

    def __init__(self, keep=None, layer=None, ratio: float = 0.5):
        super().__init__(keep, layer)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0 \
                or not math.isfinite(ratio):
            raise PrunerConfigError(f"pdrop: ratio={ratio!r}, expected a kept fraction per stage 0 < lambda <= 1")
        self.ratio = float(ratio)

    def default_keep(self, num_image: int, num_layers: int) -> tuple[int, ...]:
        return tuple(max(1, half_up(num_image * self.ratio ** (s + 1))) for s in range(len(self.layer)))

    def select(self, signals: StageSignals, stage: Stage) -> StageChoice:
        return StageChoice(keep=topk_indices(signals.last_attn, stage.num_out))   # [B, n_s]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ratio={self.ratio}"
