"""random: K positions drawn once with a fixed seed (METHODS.md, Baselines)."""
import random as _random

import torch
from torch import Tensor

from edgeprune.errors import PrunerConfigError
from edgeprune.pruners._registry import register_pruner
from edgeprune.pruners.base import Pruner, Selection
from edgeprune.pruners.ops import gather_rows

__all__ = ["RandomPruner"]


@register_pruner("random")
class RandomPruner(Pruner):
    """K positions drawn with a fixed seed, the same for every row (a baseline)."""

    requires = ("tokens",)

    def __init__(self, keep: int, seed: int = 0):
        super().__init__(keep)
        if isinstance(seed, bool) or not isinstance(seed, int):   # random.Random would hash any object silently
            raise PrunerConfigError(f"random: seed={seed!r}, expected an integer")
        self.seed = seed

    def select(self, tokens: Tensor) -> Selection:  # [B, N, D]
        b, n, _ = tokens.shape
        # Drawn with Python's own generator: the graph holds the K positions as a constant.
        drawn = sorted(_random.Random(self.seed).sample(range(n), self.keep))
        chosen = torch.tensor(drawn, dtype=torch.long, device=tokens.device)
        positions = chosen.unsqueeze(0).expand(b, -1)  # [B, K]
        return Selection(tokens=gather_rows(tokens, positions), positions=positions)
