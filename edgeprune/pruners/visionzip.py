"""visionzip: dominant + contextual tokens (METHODS.md, VisionZip-style; CVPR'25).

Reads `feats` (pre-projector), `keys` and `attn`; the K output tokens go through the projector.
Departures from the official code, as METHODS.md asks:
- The contextual token is the true mean of its target and members (the official code adds the
  members' mean to the target, doubling the norm).
- Signals hold patch tokens only, so the [CLS] token is never a candidate (the official code keeps it).
- Batch > 1, each row on its own; the non-dominant tokens are indexed sort-free (ops.unchosen_indices).
Budget split: Kc = `contextual` or max(1, round(K * 10 / 64)) (Python's round), Kd = K - Kc, e.g.
54 + 10 at K = 64. K = 1 gives Kd = 0, Kc = 1: one token, the mean of all N, at position 0.
Ties (equal attn, equal key similarity) go to the lowest index.
"""
import torch
from torch import Tensor

from edgeprune.errors import PrunerConfigError
from edgeprune.pruners._registry import register_pruner
from edgeprune.pruners.base import Pruner, Selection
from edgeprune.pruners.ops import (cosine_matrix, gather_rows, index_matrix, one_hot, sort_by_position,
                                   topk_indices, unchosen_indices)

__all__ = ["VisionZip"]


def split_budget(keep: int, contextual: int | None = None) -> tuple[int, int]:
    """(Kd, Kc): dominant and contextual counts for budget `keep` (54 + 10 at keep = 64)."""
    kc = max(1, round(keep * 10 / 64)) if contextual is None else contextual
    return keep - kc, kc


@register_pruner("visionzip")
class VisionZip(Pruner):
    """VisionZip: Kd dominant tokens by attention + Kc contextual tokens merged by key similarity."""

    requires = ("feats", "keys", "attn")
    space = "feats"

    def __init__(self, keep: int, contextual: int | None = None):
        super().__init__(keep)
        if contextual is not None and (isinstance(contextual, bool) or not isinstance(contextual, int)
                                       or not 1 <= contextual <= keep):
            raise PrunerConfigError(f"visionzip: contextual={contextual!r}, expected an integer with "
                                    f"1 <= contextual <= keep={keep}, or None for max(1, round(keep * 10 / 64))")
        self.contextual = contextual
        self.dominant_count, self.contextual_count = split_budget(keep, contextual)

    def select(self, feats: Tensor, keys: Tensor, attn: Tensor) -> Selection:  # [B, N, C], [B, N, Ck], [B, N]
        b, n, _ = feats.shape
        kd, kc = self.dominant_count, self.contextual_count
        device = feats.device

        # 1. dominant: top-Kd by attn.
        if kd > 0:
            dominant = topk_indices(attn, kd)                               # [B, Kd]
            rest = ~one_hot(dominant, n)                                    # [B, N] not dominant
        else:
            rest = torch.ones(b, n, dtype=torch.bool, device=device)

        # 2. targets: of the R = N - Kd remaining tokens in position order, every s-th, the first Kc.
        #    kc <= K - kd < N - kd = R, so the ranks (j * s <= (Kc - 1) * R / Kc) stay below R.
        step = max(1, (n - kd) // kc)
        ranks = torch.tensor([j * step for j in range(kc)], dtype=torch.long, device=device)  # [Kc]
        if kd > 0:
            targets = unchosen_indices(dominant, ranks)                     # [B, Kc] ascending
        else:
            targets = ranks.unsqueeze(0).expand(b, kc)

        # 3. every other remaining token joins the target of highest key cosine (ArgMax: first, and
        #    targets ascend, so ties go to the lowest position); a target is its own (not via cos = 1,
        #    which rounding or an equal-direction key could beat); dominant tokens join nothing.
        own = torch.arange(n, device=device).view(1, n, 1) == targets.unsqueeze(1)  # [B, N, Kc]
        best = torch.argmax(cosine_matrix(keys, gather_rows(keys, targets)), dim=-1)  # [B, N]
        joins = (best.unsqueeze(-1) == torch.arange(kc, device=device)) & rest.unsqueeze(-1)  # [B, N, Kc]
        # (a bool Where has no ONNX Runtime kernel: select with And/Or instead)
        member = (own | (joins & ~own.any(dim=-1, keepdim=True))).to(feats.dtype)  # [B, N, Kc]

        # 4. contextual token = true mean of target + members; its position is the target's.
        contextual = (member.transpose(1, 2) @ feats) / member.sum(dim=1).unsqueeze(-1)  # [B, Kc, C]
        merge = member.transpose(1, 2) / member.sum(dim=1).unsqueeze(-1)   # [B, Kc, N] (Selection.weights)

        if kd == 0:  # targets already ascend
            return Selection(tokens=contextual, positions=targets, weights=merge)
        positions = torch.cat([dominant, targets], dim=1)                   # [B, K]
        tokens = torch.cat([gather_rows(feats, dominant), contextual], dim=1)  # [B, K, C]
        weights = torch.cat([index_matrix(dominant, n, feats.dtype), merge], dim=1)  # [B, K, N]
        positions, tokens, weights = sort_by_position(positions, tokens, weights)
        return Selection(tokens=tokens, positions=positions, weights=weights)

    def extra_repr(self) -> str:
        return f"keep={self.keep}, contextual={self.contextual}"
