"""DART: duplication-aware selection around high-norm pivots (METHODS.md, DART).

Pre-LLM port of "Stop looking for important tokens" (the original runs inside the LLM on layer-1 keys
with 4 image + 4 text pivots). Differences from the paper, as METHODS.md specifies: pivots and
similarities come from `tokens`, and the output has exactly K tokens (the official code keeps its
pivots on top of the budget and overshoots by P). The optional text pivots of METHODS.md are not
implemented: the runtime passes no prompt embeddings to the vision graph.
"""
from __future__ import annotations

import torch
from torch import Tensor

from edgeprune.errors import PrunerConfigError
from edgeprune.pruners._registry import register_pruner
from edgeprune.pruners.base import Pruner, Selection
from edgeprune.pruners.ops import NEG_INF, cosine_matrix, gather_rows, one_hot, sort_by_position, topk_indices

__all__ = ["DartPruner"]


def pivot_quotas(keep: int, pivots: int) -> list[int]:
    """How many tokens each pivot takes, in pivot order: floor((K-P)/P), the first (K-P) mod P one more."""
    rest = keep - pivots
    return [rest // pivots + (1 if i < rest % pivots else 0) for i in range(pivots)]


@register_pruner("dart")
class DartPruner(Pruner):
    """DART: P high-norm pivots, each keeps its quota of the tokens least similar to it."""

    requires = ("tokens",)
    default_positions = "original"   # DART (and TensorRT Edge-LLM) keep original ids (DESIGN.md)

    def __init__(self, keep: int, pivots: int = 8):
        super().__init__(keep)
        if isinstance(pivots, bool) or not isinstance(pivots, int) or pivots < 1:
            raise PrunerConfigError(f"dart: pivots={pivots!r}, expected an integer >= 1")
        self.pivots = pivots

    def select(self, tokens: Tensor) -> Selection:                   # [B, N, D]
        n = tokens.shape[1]
        # METHODS.md asks P <= K; a budget below the default pivot count (K < P) simply keeps K pivots
        # rather than failing, so that every K in 1..N works with the defaults.
        p = min(self.pivots, self.keep)

        # 1. pivots: the P largest L1 norms, in descending order (ties to the lowest index)
        pivots = topk_indices(tokens.abs().sum(dim=-1), p)            # [B, P]
        sim = cosine_matrix(gather_rows(tokens, pivots), tokens)      # [B, P, N]

        # 2. + 3. each pivot in order takes its quota of the least similar tokens not yet kept;
        # kept tokens (pivots included) are masked so no token is taken twice.
        kept = one_hot(pivots, n)                                     # [B, N] bool
        masked = torch.tensor(NEG_INF, dtype=sim.dtype, device=sim.device)
        chosen = [pivots]
        for i, quota in enumerate(pivot_quotas(self.keep, p)):
            if quota == 0:
                continue
            score = torch.where(kept, masked, -sim[:, i])  # [B, N]
            taken = topk_indices(score, quota)                        # [B, quota], lowest cosine first
            kept = kept | one_hot(taken, n)
            chosen.append(taken)

        # 4. keep = pivots + every taken token: exactly K, unique by construction
        chosen = torch.cat(chosen, dim=1)                             # [B, K]
        positions, kept_tokens = sort_by_position(chosen, gather_rows(tokens, chosen))
        return Selection(tokens=kept_tokens, positions=positions)     # [B, K, D], [B, K] ascending

    def extra_repr(self) -> str:
        return f"keep={self.keep}, pivots={self.pivots}"
