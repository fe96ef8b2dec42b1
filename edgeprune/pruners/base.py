"""The one pruner interface: signals in, a fixed-size `Selection` out (METHODS.md, Common contract)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from edgeprune.errors import PrunerConfigError
from edgeprune.pruners.ops import check_keep, exporting

__all__ = ["Selection", "Pruner", "PrunerLike", "SIGNALS"]

# Signal name -> expected rank ("grid" is a static (H, W) tuple, not a tensor).
SIGNALS: dict[str, int] = {"tokens": 3, "feats": 3, "keys": 3, "attn": 2, "pixels": 4, "grid": 0}


@dataclass
class Selection:
    """What every pruner returns.

    tokens:    [B, K, D] kept or merged tokens, ascending by position, in the pruner's `space`.
    positions: [B, K] int64, original index (or merge representative) in 0..N-1, unique per row.
    extras:    further named graph outputs, e.g. {"gate": [B]} for adbts; the exporter adds
               every entry as a graph output and the runtime logs them.
    weights:   [B, K, N] for a method that merges: tokens = weights @ x, x the signal named by the
               pruner's `space` (a kept token's row is one-hot). None when every output token is an
               input token: tokens = x gathered at `positions`. Not a graph output: it lets an adapter
               apply exactly the same gather or merge to other per-token features (`ops.apply_selection`;
               Qwen3-VL's DeepStack features). tests/pruners/test_contract.py checks it for every method.
    """

    tokens: Tensor
    positions: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)
    weights: Tensor | None = None


@runtime_checkable
class PrunerLike(Protocol):
    """What the vision step (models/vision_step.py), the exporter and the reference need of a pruner.

    Every registered `Pruner` is one. A composite that runs registered pruners on parts of the signals
    (the tiled models' `TilePruner`, models/_tiles.py: one method per view, K split across views) is one
    too without being registered: `build()` cannot make it, only the adapter's `build_pruner` can,
    because it needs the model's layout. Calling it must keep the Selection contract (positions ascending, unique, in 0..N-1).
    """

    name: str                           # the method, as recorded in the manifest
    keep: int                           # K: tokens in every Selection
    requires: tuple[str, ...]           # signals read (adapter.encode computes only these)
    space: str                          # "tokens" (LLM space) or "feats" (projected after pruning)
    extra_outputs: tuple[str, ...]      # names of Selection.extras, added as graph outputs
    default_positions: str | None       # "original" / "compact", or None to follow the model

    def __call__(self, *, tokens: Tensor | None = None, feats: Tensor | None = None, keys: Tensor | None = None,
                 attn: Tensor | None = None, grid: tuple[int, int] | None = None,
                 pixels: Tensor | None = None) -> Selection: ...


class Pruner(nn.Module):
    """Base class. Subclasses set `requires` (and `space` if they output `feats`-space tokens) and
    implement `select(**signals)`, which receives exactly the signals in `requires`.

    `forward` validates what a user can get wrong (missing signal, rank, N mismatch, NaN or Inf, keep vs N)
    and returns the input unchanged when keep == N. Validation that reads tensor values is skipped
    while exporting (it would bake a constant branch into the graph).
    """

    name: ClassVar[str] = ""          # set by @register_pruner
    description: ClassVar[str] = ""   # set by @register_pruner from the docstring's first line
    requires: ClassVar[tuple[str, ...]] = ()
    space: ClassVar[str] = "tokens"   # the signal whose space `Selection.tokens` is in
    extra_outputs: ClassVar[tuple[str, ...]] = ()  # names of Selection.extras
    # The position mode the method was designed with ("original" for AutoSelect and DART, whose
    # papers keep original RoPE ids), or None to follow the model. Export and the reference
    # pipeline use it when the user does not choose (DESIGN.md, Position ids).
    default_positions: ClassVar[str | None] = None

    def __init__(self, keep: int):
        super().__init__()
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise PrunerConfigError(f"{self.name}: keep={keep!r}, expected an integer >= 1")
        self.keep = keep

    def forward(self, *, tokens: Tensor | None = None, feats: Tensor | None = None,
                keys: Tensor | None = None, attn: Tensor | None = None,
                grid: tuple[int, int] | None = None, pixels: Tensor | None = None) -> Selection:
        given = {"tokens": tokens, "feats": feats, "keys": keys, "attn": attn, "grid": grid, "pixels": pixels}
        n = self._validate(given)
        if "grid" in self.requires:
            given["grid"] = self._grid(grid, n)
        signals = {name: given[name] for name in self.requires}
        check_keep(self.name, self.keep, n)
        if self.keep == n:
            return self.identity(**signals)
        return self.select(**signals)

    def select(self, **signals) -> Selection:
        raise NotImplementedError

    def identity(self, **signals) -> Selection:
        """keep == N: every token, in order. Methods with extras override this to add them."""
        x = signals[self.space]
        b, n = x.shape[:2]
        positions = torch.arange(n, device=x.device).unsqueeze(0).expand(b, n)
        return Selection(tokens=x, positions=positions)

    # -- validation -------------------------------------------------------------------------------
    def _validate(self, given: dict) -> int:
        missing = [name for name in self.requires if name != "grid" and given[name] is None]
        if missing:
            raise PrunerConfigError(f"{self.name}: missing signal(s) {', '.join(missing)}; "
                                    f"this method requires {', '.join(self.requires)}")
        n = b = None
        for name in self.requires:
            x = given[name]
            if name == "grid" or x is None:
                continue
            if not isinstance(x, Tensor):
                raise PrunerConfigError(f"{self.name}: signal '{name}' is a {type(x).__name__}, expected a torch.Tensor")
            if x.dim() != SIGNALS[name]:
                raise PrunerConfigError(f"{self.name}: signal '{name}' has shape {tuple(x.shape)}, "
                                        f"expected rank {SIGNALS[name]}")
            if b is not None and x.shape[0] != b:
                raise PrunerConfigError(f"{self.name}: signal '{name}' has batch {x.shape[0]}, other signals {b}")
            b = x.shape[0]
            if name != "pixels":
                if n is not None and x.shape[1] != n:
                    raise PrunerConfigError(f"{self.name}: signal '{name}' has N={x.shape[1]}, other signals N={n}")
                n = x.shape[1]
            if not exporting() and x.is_floating_point() and not torch.isfinite(x).all():
                bad = "NaN" if torch.isnan(x).any() else "Inf"
                raise PrunerConfigError(f"{self.name}: signal '{name}' contains {bad}; expected finite values")
        if n is None:  # only grid (and/or pixels) required: N comes from the grid or any token signal
            n = next((given[s].shape[1] for s in ("tokens", "feats", "keys", "attn") if given[s] is not None), None)
            if n is None and given["grid"] is not None:
                n = given["grid"][0] * given["grid"][1]
            if n is None:
                raise PrunerConfigError(f"{self.name}: cannot tell N; pass tokens or grid")
        return int(n)

    def _grid(self, grid, n: int) -> tuple[int, int]:
        if grid is None:
            side = math.isqrt(n)
            if side * side != n:
                raise PrunerConfigError(f"{self.name}: grid not given and N={n} is not a square; pass grid=(H, W)")
            return side, side
        h, w = (int(v) for v in grid)
        if h * w != n:
            raise PrunerConfigError(f"{self.name}: grid={tuple(grid)} has {h * w} cells, expected H*W = N={n}")
        return h, w

    def extra_repr(self) -> str:
        return f"keep={self.keep}"
