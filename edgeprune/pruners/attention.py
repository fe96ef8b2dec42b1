"""attention: top-K tokens by encoder importance `attn` (FastV-style, at the encoder; METHODS.md, Baselines)."""
from torch import Tensor

from edgeprune.pruners._registry import register_pruner
from edgeprune.pruners.base import Pruner, Selection
from edgeprune.pruners.ops import gather_rows, sort_by_position, topk_indices

__all__ = ["AttentionPruner"]


@register_pruner("attention")
class AttentionPruner(Pruner):
    """Top-K tokens by encoder attention ([CLS]-to-patch, or mean received without [CLS])."""

    requires = ("tokens", "attn")

    def select(self, tokens: Tensor, attn: Tensor) -> Selection:  # [B, N, D], [B, N]
        chosen = topk_indices(attn, self.keep)                     # [B, K] by descending attn
        positions, kept = sort_by_position(chosen, gather_rows(tokens, chosen))
        return Selection(tokens=kept, positions=positions)
