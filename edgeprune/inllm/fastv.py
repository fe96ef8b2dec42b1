"""FastV: the image tokens the last token attends to most at layer L-1 (METHODS_INLLM.md §2).

The last-token row of the head-mean attention (FastV's code and D2Pruner's description), not DART's
Eq. 2 mean over queries (F1). Default L = 2 ("an image is worth 1/2 tokens after layer 2") and
R = 0.5: K2 = floor(K * (1 - R) + 0.5), 288 of 576. With several layers each stage keeps
floor(n * (1 - R) + 0.5) of the n entering it.
"""
from __future__ import annotations

import math

from edgeprune.errors import PrunerConfigError
from edgeprune.inllm._registry import register_stage
from edgeprune.inllm.base import LLMStage, Stage, StageChoice, StageSignals, half_up
from edgeprune.pruners.ops import topk_indices

__all__ = ["FastV"]


@register_stage("fastv")
class FastV(LLMStage):
    """FastV: keep the image tokens the last token attends to most at layer L-1."""

    requires = ("last_attn",)
    default_layers = (2,)

    def __init__(self, keep=None, layer=None, ratio: float = 0.5):
        super().__init__(keep, layer)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0 \
                or not math.isfinite(ratio):
            raise PrunerConfigError(f"fastv: ratio={ratio!r}, expected a pruned fraction 0 <= R < 1")
        self.ratio = float(ratio)

    def default_keep(self, num_image: int, num_layers: int) -> tuple[int, ...]:
        counts, n = [], num_image
        for _ in self.layer:
            n = max(1, half_up(n * (1.0 - self.ratio)))
            counts.append(n)
        return tuple(counts)

    def select(self, signals: StageSignals, stage: Stage) -> StageChoice:
        # top-K2 by A^(L-1)[last, image], ties to the lowest slot
        return StageChoice(keep=topk_indices(signals.last_attn, stage.num_out))   # [B, K2]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ratio={self.ratio}"
