"""The one in-LLM stage interface (METHODS_INLLM.md §1): layer L-1 signals in, kept image slots out.

A method (`LLMStage` subclass, one module each) only scores and selects: `select(signals, stage)`
returns which of the n current image slots stay (and, for merges, their new hidden states). Everything
around it, the same for every method, is in boundary.py: computing the signals the method `requires`,
sorting, gathering hidden states / position ids / mask / KV cache, the KV policy.

Budgets (§1, Budget rule): a method is built with explicit stage layers `layer` = (L_1 < ... < L_m)
and counts `keep` = (n_1 >= ... >= n_m); `bind(K, T)` checks them against the model and returns the
`Stage`s. runtime.stages `layer_average` and `keep_for_average` convert between counts and the layer-average
visual token count some papers quote (runtime/stages.py, torch-free: the runtime and profiler use them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

from torch import Tensor, nn

from edgeprune.errors import PrunerConfigError
from edgeprune.runtime.stages import KV_POLICIES, half_up

__all__ = ["LLMStage", "Stage", "StageSignals", "StageChoice", "SIGNALS", "KV_POLICIES", "half_up"]

# What a method may `require` (computed at the boundary only when asked for):
#   hidden    image_hidden [B, n, D] and text_hidden [B, M, D]: h^(L-1), the residual stream
#   keys      image_keys [B, Hkv, n, dh] and text_keys [B, Hkv, M, dh]: K^(L-1) after RoPE
#   last_attn [B, n]: A^(L-1)[last valid token, image slots], head mean, fp32
#   positions [B, n] int64: each slot's original index on the grid (H, W) = StageSignals.grid
# text_mask [B, M] (valid text tokens, right padding) and final_norm (the model's RMSNorm_final) are
# always given.
SIGNALS = ("hidden", "keys", "last_attn", "positions")


@dataclass(frozen=True)
class Stage:
    """One reduction: from layer `layer` on, `num_out` of the `num_in` current image slots remain."""

    layer: int
    num_in: int
    num_out: int


@dataclass
class StageSignals:
    """What a method may read at the boundary (fp32; None when not in `requires`)."""

    text_mask: Tensor                       # [B, M] bool, valid tokens after the image
    final_norm: nn.Module | None = None     # RMSNorm_final, weight included
    image_hidden: Tensor | None = None      # [B, n, D]
    text_hidden: Tensor | None = None       # [B, M, D]
    image_keys: Tensor | None = None        # [B, Hkv, n, dh] post-RoPE
    text_keys: Tensor | None = None         # [B, Hkv, M, dh]
    last_attn: Tensor | None = None         # [B, n]
    positions: Tensor | None = None         # [B, n] grid index r * W + c of each slot
    grid: tuple[int, int] | None = None     # (H, W) of the grid `positions` index


@dataclass
class StageChoice:
    """keep [B, K2] int64: indices into the n current slots, unique per row, any order.
    hidden [B, K2, D]: new hidden states of those slots, row-aligned with `keep` (merges); None keeps
    the slots' own states."""

    keep: Tensor
    hidden: Tensor | None = None


def _int_tuple(value, what: str, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    values = (value,) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise PrunerConfigError(f"{name}: {what}={value!r}, expected an integer or a non-empty list of integers")
    return values


class LLMStage(nn.Module):
    """Base class. Subclasses set `requires` and `default_layers` and implement `select`.

    keep:  post-stage image token counts, one per stage layer (None: the method's default_keep).
    layer: first reduced layer of each stage, 0-based (None: default_layers).
    """

    name: ClassVar[str] = ""             # set by @register_stage
    description: ClassVar[str] = ""      # set by @register_stage from the docstring's first line
    requires: ClassVar[tuple[str, ...]] = ()
    default_layers: ClassVar[tuple[int, ...]] = (2,)
    min_text_tokens: int = 0    # a row needs this many valid text tokens after the image (DART's text pivots)

    def __init__(self, keep: int | Sequence[int] | None = None, layer: int | Sequence[int] | None = None):
        super().__init__()
        self.keep = _int_tuple(keep, "keep", self.name)
        self.layer = _int_tuple(layer, "layer", self.name) or tuple(self.default_layers)
        if self.keep is not None and len(self.keep) != len(self.layer):
            raise PrunerConfigError(f"{self.name}: {len(self.keep)} keep value(s) {list(self.keep)} for "
                                    f"{len(self.layer)} stage layer(s) {list(self.layer)}; expected one per layer")

    # -- budgets ---------------------------------------------------------------------------------------

    def min_keep(self) -> int:
        """The smallest post-stage count the method can produce (DART: its image pivots)."""
        return 1

    def default_keep(self, num_image: int, num_layers: int) -> tuple[int, ...]:
        raise PrunerConfigError(f"{self.name}: no default budget; pass keep (--llm-keep) or an average "
                                f"(--llm-average)")

    def bind(self, num_image: int, num_layers: int) -> tuple[Stage, ...]:
        """The stages for K = `num_image` image tokens entering a T = `num_layers` LLM; a clear error
        naming the method, L, K, K2 and T for any budget the spec forbids (§1, G10)."""
        keep = self.keep if self.keep is not None else self.default_keep(num_image, num_layers)
        stages, n = [], num_image
        for i, (layer, k2) in enumerate(zip(self.layer, keep)):
            where = f"{self.name}: stage {i + 1} L={layer}, K={n} -> K2={k2}, T={num_layers}"
            if not 1 <= layer <= num_layers - 1:
                raise PrunerConfigError(f"{where}: expected 1 <= L <= T-1 = {num_layers - 1}")
            if stages and layer <= stages[-1].layer:
                raise PrunerConfigError(f"{where}: stage layers must increase (previous L={stages[-1].layer})")
            if k2 > n:
                raise PrunerConfigError(f"{where}: expected K2 <= K (a stage only removes tokens)")
            if k2 < self.min_keep():
                raise PrunerConfigError(f"{where}: expected K2 >= {self.min_keep()} ({self.min_keep_reason()})")
            stages.append(Stage(layer=layer, num_in=n, num_out=k2))
            n = k2
        return tuple(stages)

    def min_keep_reason(self) -> str:
        return "at least one image token"

    # -- selection -------------------------------------------------------------------------------------
    def select(self, signals: StageSignals, stage: Stage) -> StageChoice:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"keep={list(self.keep) if self.keep else 'default'}, layer={list(self.layer)}"
