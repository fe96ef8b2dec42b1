"""dpc: DPC-KNN merge, density-peak clustering of `feats` into K tokens (METHODS.md, DPC-KNN merge).

Polymorphic's stage 1 on its own; `dpc_merge` is the shared math (polymorphic reuses it).
Where METHODS.md is silent:
- Density ties. The official code (TCFormer's cluster_dpc_knn) adds 1e-6 random noise to rho so no
  two tokens tie; we need determinism instead, so "higher density" is a strict total order:
  j is denser than i iff rho_j > rho_i, or rho_j == rho_i and j < i (the lower index wins, as every
  tie in METHODS.md). Exact duplicates (flat padding) then give delta = 0 to all but the first copy.
- The densest token's delta is max(D) over the whole image, as the official `flatten(1).max()`.
- The small-K rule for k (k = min(3, max(K//2, 1)) when k > K) reads K as the number of clusters,
  as the reference DPC-KNN code (TCFormer's CTM block) does with `cluster_num`.
- Ties in nearest centre go to the centre with the lowest position; centres are listed by position.
"""
import torch
from torch import Tensor

from edgeprune.errors import PrunerConfigError
from edgeprune.pruners._registry import register_pruner
from edgeprune.pruners.base import Pruner, Selection
from edgeprune.pruners.ops import sort_by_position, topk_indices

__all__ = ["DPCPruner", "dpc_merge", "dpc_density_delta", "dpc_sq_distances", "knn_k"]


def knn_k(k_neighbors: int, keep: int) -> int:
    """Neighbours for the density: k, or min(3, max(keep // 2, 1)) when k > keep (METHODS.md step 1)."""
    return k_neighbors if k_neighbors <= keep else min(3, max(keep // 2, 1))


def dpc_sq_distances(feats: Tensor) -> Tensor:
    """D^2 = ||xi - xj||^2 / C from one Gram matrix of x / sqrt(C) (scaled first, so fp16 does not
    overflow on |x|^2 of wide encoders). [B, N, N]

    x @ (2x)^T is exactly twice the Gram matrix (scaling by 2 is exact), which saves an N x N
    multiply; the squared norms are its own diagonal halved (a strided Slice; torch.diagonal
    would export to EyeLike), so the diagonal is (g + g) - 2g = 0 exactly: "self included" adds 0.
    Off the diagonal rounding can give tiny negatives; callers clamp what they take a root of.
    """
    n, c = feats.shape[1:]
    x = feats * (1.0 / c ** 0.5)                                          # [B, N, C]
    gram2 = x @ (2.0 * x).transpose(1, 2)                                 # [B, N, N] = 2 x Gram
    sq = gram2.flatten(1)[:, :: n + 1] * 0.5                              # [B, N] = |x_i|^2
    return sq.unsqueeze(2) + sq.unsqueeze(1) - gram2                     # [B, N, N]


def dpc_density_delta(feats: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Steps 1-2 of DPC-KNN on feats [B, N, C]: (rho [B, N], delta [B, N], D^2 [B, N, N])."""
    b, n, _ = feats.shape
    # In float32 whatever the input: D^2 by the Gram identity cancels badly in fp16, and high-dim
    # features are nearly equidistant, so fp16 would reorder rho and delta far beyond near-ties.
    d2 = dpc_sq_distances(feats.float())                                  # [B, N, N] = D^2

    # 1. density: rho_i = exp(-mean of the k smallest D^2, self (0) included). TopK values do not
    #    depend on how ties are ordered, so a plain TopK (smallest) is exact here.
    nearest = torch.topk(d2, k, dim=-1, largest=False, sorted=True).values.clamp_min(0.0)  # [B, N, k]
    rho = torch.exp(-nearest.mean(dim=-1))                                # [B, N]

    # 2. delta_i = distance to the nearest denser token (strict order, ties to the lower index);
    #    the densest has none, and the min over {D to denser} and max(D) then gives it max(D).
    #    The index order is expanded to the batch so the exporter cannot fold an N x N constant.
    index = torch.arange(n, device=feats.device).unsqueeze(0).expand(b, n)  # [B, N]
    rho_i, rho_j = rho.unsqueeze(2), rho.unsqueeze(1)                      # [B, N, 1], [B, 1, N]
    denser = (rho_j > rho_i) | ((rho_j == rho_i) & (index.unsqueeze(1) < index.unsqueeze(2)))  # [B, N, N]
    d2_max = d2.flatten(1).max(dim=-1).values.view(b, 1, 1)               # [B, 1, 1] per image
    delta = torch.where(denser, d2, d2_max).min(dim=-1).values.clamp_min(0.0).sqrt()  # [B, N]
    return rho, delta, d2


def dpc_merge(feats: Tensor, keep: int, k_neighbors: int = 5) -> tuple[Tensor, Tensor, Tensor]:
    """Cluster the N tokens of each row of `feats` [B, N, C] into `keep` < N clusters.

    Returns (merged [B, K, C] cluster means, centres [B, K] int64 ascending, indices into N,
    merge weights [B, K, N]: merged = weights @ feats, Selection.weights).
    """
    b, n, _ = feats.shape
    rho, delta, d2 = dpc_density_delta(feats, knn_k(k_neighbors, keep))  # [B, N], [B, N], [B, N, N]

    # 3. centres: top-K of rho * delta, listed by position; every token joins its nearest centre,
    #    a centre its own (-1 < any D^2), ties to the lowest-position centre (ArgMin: first).
    centres = sort_by_position(topk_indices(rho * delta, keep))[0]        # [B, K] ascending
    to_centre = torch.gather(d2, 2, centres.unsqueeze(1).expand(b, n, keep))  # [B, N, K]
    own = torch.arange(n, device=feats.device).view(1, n, 1) == centres.unsqueeze(1)  # [B, N, K]
    cluster = torch.argmin(torch.where(own, -1.0, to_centre), dim=-1)      # [B, N]
    member = (cluster.unsqueeze(-1) == torch.arange(keep, device=feats.device)).to(feats.dtype)  # [B, N, K]
    # Merged token = cluster mean (every cluster holds at least its centre).
    merged = (member.transpose(1, 2) @ feats) / member.sum(dim=1).unsqueeze(-1)  # [B, K, C]
    weights = member.transpose(1, 2) / member.sum(dim=1).unsqueeze(-1)    # [B, K, N]
    return merged, centres, weights


@register_pruner("dpc")
class DPCPruner(Pruner):
    """DPC-KNN merge: K density-peak clusters of `feats`, each the mean of its members."""

    requires = ("feats",)
    space = "feats"

    def __init__(self, keep: int, k_neighbors: int = 5):
        super().__init__(keep)
        if isinstance(k_neighbors, bool) or not isinstance(k_neighbors, int) or k_neighbors < 1:
            raise PrunerConfigError(f"dpc: k_neighbors={k_neighbors!r}, expected an integer >= 1")
        self.k_neighbors = k_neighbors

    def select(self, feats: Tensor) -> Selection:  # [B, N, C]
        merged, centres, weights = dpc_merge(feats, self.keep, self.k_neighbors)  # [B, K, C], [B, K] ascending
        return Selection(tokens=merged, positions=centres, weights=weights)

    def extra_repr(self) -> str:
        return f"keep={self.keep}, k_neighbors={self.k_neighbors}"
