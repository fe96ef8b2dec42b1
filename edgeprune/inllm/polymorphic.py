"""Polymorphic stage 2: text-rated pruning at layers 3, 7, 16 with the pruned tokens merged again
(METHODS_INLLM.md §5).

At each stage: Mx = softmax over the valid text of V Tx^T / sqrt(D) (V, Tx = h^(L-1) of the current
image slots and of the text after the image, Y3); raters are the text tokens with s_j = mean_i Mx_ij
> 1/M_b (Y4: the mean s-bar is exactly 1/M_b; strict; none -> all valid text); alpha_i = the mean of
Mx_ij over the raters. The stage keeps n_s - c_s slots by alpha and merges the others into
c_s = max(1, n_s - round(n_s * 5.4 / 6.4)) DPC-KNN clusters (Y6) - exactly the stage-1 pruner
(pruners/polymorphic.py) run with feats = h^(L-1), attn = alpha, keep = n_s. `merge_pruned=False`
keeps the top n_s by alpha instead. A merged slot keeps its centre's position and (uniform KV policy)
its centre's cache. Counts: explicit, or solved for a layer average (--llm-average: the geometric
schedule of §5.1); stage 1 itself is the pre-LLM `--method polymorphic --keep round(2 * B)`.
"""
from __future__ import annotations

import torch

from edgeprune.errors import PrunerConfigError
from edgeprune.inllm._registry import register_stage
from edgeprune.inllm.base import LLMStage, Stage, StageChoice, StageSignals
from edgeprune.pruners.ops import NEG_INF, topk_indices
from edgeprune.pruners.polymorphic import Polymorphic as Stage1

__all__ = ["PolymorphicStage2", "rater_scores"]


def rater_scores(image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """alpha [B, n] from V [B, n, D], Tx [B, M, D] and the valid text [B, M] (steps b-d)."""
    logits = image @ text.transpose(1, 2) / image.shape[-1] ** 0.5                 # [B, n, M]
    mx = torch.softmax(torch.where(text_mask.unsqueeze(1), logits, torch.tensor(NEG_INF)), dim=-1)
    s = mx.mean(dim=1)                                                             # [B, M], sums to 1 over text
    valid = text_mask.to(mx.dtype)                                                 # [B, M]
    raters = (s * valid.sum(dim=1, keepdim=True) > 1.0).to(mx.dtype) * valid      # s_j > 1/M_b, strict
    raters = torch.where(raters.sum(dim=1, keepdim=True) > 0, raters, valid)       # none -> every valid token
    return (mx * raters.unsqueeze(1)).sum(dim=-1) / raters.sum(dim=1, keepdim=True)  # [B, n]


@register_stage("polymorphic")
class PolymorphicStage2(LLMStage):
    """Polymorphic stage 2: text raters score the image tokens at layers 3/7/16; the pruned merge by DPC-KNN."""

    requires = ("hidden",)
    default_layers = (3, 7, 16)

    def __init__(self, keep=None, layer=None, merge_pruned: bool = True, k_neighbors: int = 5):
        super().__init__(keep, layer)
        if not isinstance(merge_pruned, bool):
            raise PrunerConfigError(f"polymorphic: merge_pruned={merge_pruned!r}, expected true or false")
        if isinstance(k_neighbors, bool) or not isinstance(k_neighbors, int) or k_neighbors < 1:
            raise PrunerConfigError(f"polymorphic: k_neighbors={k_neighbors!r}, expected an integer >= 1")
        self.merge_pruned, self.k_neighbors = merge_pruned, k_neighbors

    def select(self, signals: StageSignals, stage: Stage) -> StageChoice:
        image = signals.image_hidden                                               # [B, n, D]
        alpha = rater_scores(image, signals.text_hidden, signals.text_mask)       # [B, n]
        if not self.merge_pruned:
            return StageChoice(keep=topk_indices(alpha, stage.num_out))            # e. TopK(alpha)
        # e.-f. the top n_s - c_s by alpha as they are, the rest as c_s DPC-KNN clusters (stage 1's code)
        merged = Stage1(keep=stage.num_out, k_neighbors=self.k_neighbors).select(feats=image, attn=alpha)
        return StageChoice(keep=merged.positions, hidden=merged.tokens)            # [B, n_s], [B, n_s, D]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, merge_pruned={self.merge_pruned}, k_neighbors={self.k_neighbors}"
