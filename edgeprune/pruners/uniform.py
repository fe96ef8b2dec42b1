"""uniform: K positions evenly spaced on the patch grid (METHODS.md, Baselines).

METHODS.md says "evenly spaced on the grid (spatial stride sampling)" without a formula; ours:
r = min(H, max(ceil(K / W), round(sqrt(K * H / W)))) rows at the centres floor((i + 0.5) * H / r),
the K points split over them (the first K mod r rows get one more), and the k_i points of a row at
columns floor((j + 0.5) * W / k_i). K = 64 on 24x24 gives the 8x8 lattice of stride 3.
"""
import math

import torch
from torch import Tensor

from edgeprune.pruners._registry import register_pruner
from edgeprune.pruners.base import Pruner, Selection
from edgeprune.pruners.ops import gather_rows

__all__ = ["UniformPruner", "uniform_positions"]


def uniform_positions(keep: int, grid: tuple[int, int]) -> list[int]:
    """The ascending raster indices of the lattice described in the module docstring."""
    h, w = grid
    rows = min(h, max(math.ceil(keep / w), round(math.sqrt(keep * h / w))))
    per_row = [keep // rows + (1 if i < keep % rows else 0) for i in range(rows)]
    positions = []
    for i, k_i in enumerate(per_row):
        y = int((i + 0.5) * h / rows)
        positions += [y * w + int((j + 0.5) * w / k_i) for j in range(k_i)]
    return positions


@register_pruner("uniform")
class UniformPruner(Pruner):
    """K positions evenly spaced on the grid (spatial stride sampling; a baseline)."""

    requires = ("tokens", "grid")

    def select(self, tokens: Tensor, grid: tuple[int, int]) -> Selection:  # [B, N, D]
        chosen = torch.tensor(uniform_positions(self.keep, grid), dtype=torch.long, device=tokens.device)
        positions = chosen.unsqueeze(0).expand(tokens.shape[0], -1)  # [B, K], ascending by construction
        return Selection(tokens=gather_rows(tokens, positions), positions=positions)
