"""DivPrune: max-min diversity selection (METHODS.md, DivPrune; CVPR'25).

Differs from the paper's code as METHODS.md asks: the greedy step keeps a running minimum distance
to the selected set (O(K*N) per row instead of recomputing it, O(K^2*N)), selected tokens are masked
out explicitly instead of relying on d(j, j) = 0, and ties go to the lowest index. The greedy loop is
unrolled in Python for the static K, so the graph has K-1 small blocks and no Loop.
"""
from __future__ import annotations

import torch
from torch import Tensor

from edgeprune.pruners._registry import register_pruner
from edgeprune.pruners.base import Pruner, Selection
from edgeprune.pruners.ops import NEG_INF, argmax, cosine_matrix, gather_rows, sort_by_position

__all__ = ["DivPrune", "max_min_order"]


@register_pruner("divprune")
class DivPrune(Pruner):
    """DivPrune: greedy max-min diversity on cosine distance of the post-projector tokens."""

    requires = ("tokens",)

    def select(self, tokens: Tensor) -> Selection:                   # [B, N, D]
        chosen = max_min_order(tokens, self.keep)                     # [B, K] in greedy order
        positions, kept = sort_by_position(chosen, gather_rows(tokens, chosen))
        return Selection(tokens=kept, positions=positions)            # [B, K, D], [B, K] ascending


def max_min_order(tokens: Tensor, count: int) -> Tensor:
    """DivPrune's picks [B, count] in the order the greedy loop makes them (tokens [B, N, D]).

    The order is nested: no step depends on `count`, so the first K picks of any count >= K are exactly
    DivPrune's K-selection (AutoSelect's distillation target, scripts/train_mini_scorer.py, uses that)."""
    b, n = tokens.shape[0], tokens.shape[1]  # traced sizes: aranges stay Range ops, not constants
    # d(i, j) = 1 - cos(i, j), formed only where needed: fl(1 - x) is monotone, so
    # 1 - max(cos) equals min(1 - cos) bit for bit, and an N x N subtraction is saved.
    cos = cosine_matrix(tokens)                                   # [B, N, N]
    ar = torch.arange(n, device=tokens.device)                    # [N]
    masked = torch.tensor(NEG_INF, dtype=cos.dtype, device=cos.device)

    # 1. first pick: the most isolated token, i.e. the largest distance to its nearest OTHER token.
    # Self is excluded by index (arange equality), not by trusting d(j, j) = 0, which rounding can
    # break: of each row's two largest cosines, take the first unless it is the token itself.
    # (A tie between the two means equal values, so TopK's tie order cannot matter here; this is
    # about twice as fast in ONNX Runtime as masking an N x N matrix.)
    top = torch.topk(cos, 2, dim=-1)                              # values, indices [B, N, 2]
    other = torch.where(top.indices[..., 0] == ar, top.values[..., 1], top.values[..., 0])  # [B, N]
    nearest = 1.0 - other                                         # [B, N] min over j != i of d(i, j)
    pick = argmax(nearest)                                        # [B], ties to the lowest index

    # 2. K-1 greedy steps on m_j = min over selected s of d(s, j); selected tokens hold NEG_INF
    # (min keeps them there), so argmax never returns a token twice.
    flat = cos.reshape(-1, n)                                     # [B*N, N]: one Gather a step
    row_offset = torch.arange(b, device=tokens.device) * n       # [B]
    ar_row = ar.unsqueeze(0)                                      # [1, N]
    m = None
    chosen = [pick]
    for _ in range(count - 1):
        row = 1.0 - flat.index_select(0, pick + row_offset)       # [B, N] = d(pick, .)
        m = row if m is None else torch.minimum(m, row)          # [B, N]
        m = torch.where(ar_row == pick.unsqueeze(1), masked, m)   # the pick itself is out
        pick = argmax(m)                                          # [B], first maximum
        chosen.append(pick)

    return torch.stack(chosen, dim=1)                             # [B, count]
