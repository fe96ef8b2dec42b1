"""The vision step, written once: pixels -> encode -> prune -> project -> K image tokens and their positions.

    signals   = adapter.encode(pixels, signals_needed(pruner))     # only what the pruner reads (+ its space)
    selection = pruner(**signals)                                  # [B, K, D] in the pruner's space, [B, K]
    tokens    = selection.tokens if space == "tokens" else adapter.project(selection.tokens)   # [B, K, D_llm]
    deepstack = adapter.deepstack(signals, selection, pruner)      # DeepStack models only: [B, K, L, D_llm]

Three callers run exactly this code, so "the torch reference equals the exported graph" holds by
construction: the exported vision graph (export/vision.py `VisionGraph.forward`), the torch reference
(reference.py `encode_and_prune`), and the multi-view pruner of the tiled models (models/_tiles.py
`TilePruner`: LLaVA-NeXT, InternVL, SmolVLM), which runs `prune_and_project` once per view.

DeepStack (Qwen3-VL, adapter.deepstack_layers > 0): the kept tokens' DeepStack features go through the
same gather or merge (Selection.weights) and come back as extras[VISION_DEEPSTACK], the graph output of
that name.
"""
from __future__ import annotations

import torch
from torch import Tensor

from edgeprune.pruners.base import PrunerLike, Selection
from edgeprune.runtime.format import VISION_DEEPSTACK

__all__ = ["signals_needed", "prune_and_project", "vision_step"]


def signals_needed(pruner: PrunerLike | None) -> tuple[str, ...]:
    """What `adapter.encode` must compute for `pruner`: the signals it reads, plus the space its output
    lives in ("tokens" or "feats"). No pruner: the projected tokens only."""
    if pruner is None:
        return ("tokens",)
    need = [s for s in pruner.requires if s != "grid"]
    if pruner.space not in need:
        need.append(pruner.space)
    return tuple(need)


def prune_and_project(pruner: PrunerLike, signals: dict, project) -> Selection:
    """`pruner(**signals)`, its tokens brought to the LLM's space (`project` for a feats-space pruner):
    Selection(tokens [B, K, D_llm], positions [B, K] int64, extras, weights: the pruner's own, in its space)."""
    sel = pruner(**signals)
    tokens = sel.tokens if pruner.space == "tokens" else project(sel.tokens)
    return Selection(tokens=tokens, positions=sel.positions.to(torch.int64), extras=sel.extras, weights=sel.weights)


def vision_step(adapter, pruner: PrunerLike | None, pixels: Tensor) -> Selection:
    """pixels [B, 3, h, w] -> Selection(tokens [B, K, D_llm], positions [B, K] int64, extras); pruner None:
    all N tokens (adapter.unpruned: the tiled models add their fixed tokens). extras holds the pruner's
    extra outputs and, for a DeepStack model, VISION_DEEPSTACK [B, K, L, D_llm]."""
    need = signals_needed(pruner)
    signals = adapter.encode(pixels, need)
    if pruner is None:
        tokens, positions = adapter.unpruned(signals)
        sel = Selection(tokens=tokens, positions=positions.to(torch.int64))   # every token: a gather of all N
    else:
        if "pixels" in need and signals.pixels is None:   # an adapter that does not hand the pixels back itself
            signals.pixels = pixels
        sel = prune_and_project(pruner, signals.as_kwargs(), adapter.project)
    if adapter.deepstack_layers:
        sel.extras = {**sel.extras, VISION_DEEPSTACK: adapter.deepstack(signals, sel, pruner)}
    return sel
