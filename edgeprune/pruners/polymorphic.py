"""polymorphic: dominant tokens + DPC-KNN clusters of the rest (METHODS.md, DPC-KNN merge, `polymorphic`).

Stage 1 of the Polymorphic pruner only (stage 2 is in-LLM and comes later). Reads `feats` and
`attn`; the K output tokens go through the projector.
Budget: Kc = max(1, K - round(K * 5.4 / 6.4)) clusters (Python's round), Kk = K - Kc dominant,
54 + 10 at K = 64. K = 1 gives Kk = 0, Kc = 1: one cluster of all N tokens, at its centre.
Exactly the spec, with static shapes: the M = N - Kk other tokens are gathered in position order
(ops.unchosen_indices, sort-free over N) and clustered alone, so the dominant tokens take no part
in density, centre choice or membership. DPC tie rules and the small-K rule for k (read with
K = Kc, the number of clusters) are those of pruners/dpc.py.
"""
import torch
from torch import Tensor

from edgeprune.errors import PrunerConfigError
from edgeprune.pruners._registry import register_pruner
from edgeprune.pruners.base import Pruner, Selection
from edgeprune.pruners.dpc import dpc_merge
from edgeprune.pruners.ops import gather_rows, index_matrix, sort_by_position, topk_indices, unchosen_indices

__all__ = ["Polymorphic"]


def split_budget(keep: int) -> tuple[int, int]:
    """(Kk, Kc): dominant and cluster counts for budget `keep` (54 + 10 at keep = 64; 5.4 : 1)."""
    kc = max(1, keep - round(keep * 5.4 / 6.4))
    return keep - kc, kc


@register_pruner("polymorphic")
class Polymorphic(Pruner):
    """Polymorphic stage 1: Kk dominant tokens by attention + Kc DPC-KNN clusters of the others."""

    requires = ("feats", "attn")
    space = "feats"

    def __init__(self, keep: int, k_neighbors: int = 5):
        super().__init__(keep)
        if isinstance(k_neighbors, bool) or not isinstance(k_neighbors, int) or k_neighbors < 1:
            raise PrunerConfigError(f"polymorphic: k_neighbors={k_neighbors!r}, expected an integer >= 1")
        self.k_neighbors = k_neighbors
        self.dominant_count, self.cluster_count = split_budget(keep)

    def select(self, feats: Tensor, attn: Tensor) -> Selection:  # [B, N, C], [B, N]
        n = feats.shape[1]
        kk, kc = self.dominant_count, self.cluster_count
        if kk == 0:  # K = 1: nothing dominant, cluster every token
            merged, centres, weights = dpc_merge(feats, kc, self.k_neighbors)  # [B, 1, C], [B, 1], [B, 1, N]
            return Selection(tokens=merged, positions=centres, weights=weights)

        # 1. dominant: top-Kk by attn, kept as they are.
        dominant = topk_indices(attn, kk)                                   # [B, Kk]

        # 2. the other M = N - Kk tokens in position order (M > Kc since K < N), clustered alone.
        ranks = torch.arange(n - kk, device=feats.device)                   # [M]
        others = unchosen_indices(dominant, ranks)                          # [B, M] ascending
        merged, centres, merge = dpc_merge(gather_rows(feats, others), kc, self.k_neighbors)  # [B, Kc, C], [B, Kc]
        centres = torch.gather(others, 1, centres)                          # [B, Kc] back to 0..N-1
        merge = merge @ index_matrix(others, n, feats.dtype)                # [B, Kc, M] -> [B, Kc, N]

        # 3. output = dominant + merged clusters (position = the centre's), ascending by position.
        positions = torch.cat([dominant, centres], dim=1)                   # [B, K]
        tokens = torch.cat([gather_rows(feats, dominant), merged], dim=1)   # [B, K, C]
        weights = torch.cat([index_matrix(dominant, n, feats.dtype), merge], dim=1)  # [B, K, N]
        positions, tokens, weights = sort_by_position(positions, tokens, weights)
        return Selection(tokens=tokens, positions=positions, weights=weights)

    def extra_repr(self) -> str:
        return f"keep={self.keep}, k_neighbors={self.k_neighbors}"
