"""The torch reference of a prefill with in-LLM stages and of the decode after it.

The model's own decoder layers (transformers modules, sdpa attention, `DynamicCache`) are called one
at a time so that `StageRunner.apply` can run between layer L-1 and L: the same boundary code the
exported prefill graph traces, on independently computed layers. Each layer keeps the attention mask
of the sequence its cache holds: one for every layer under the "uniform" KV policy, one per KV group
under "faithful". A decode step appends one valid token to every layer's mask.
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from edgeprune.inllm.boundary import LLMParts, PrefillState, StageRunner, last_token_attention
from edgeprune.pruners.ops import gather_rows

__all__ = ["StagedLM", "causal_mask"]


def causal_mask(attention_mask: Tensor, length: int, dtype: torch.dtype) -> Tensor:
    """attention_mask [B, T] (1 = attend) -> additive [B, 1, L, T] for the last L queries: causal by sequence
    order (position ids may have gaps), padding keys masked."""
    t = attention_mask.shape[1]
    causal = torch.arange(t).unsqueeze(0) <= (torch.arange(length) + (t - length)).unsqueeze(1)   # [L, T]
    allowed = causal.unsqueeze(0) & attention_mask.bool().unsqueeze(1)                            # [B, L, T]
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype).unsqueeze(1)


class StagedLM:
    """`prefill(...)` then `step(...)` per new token, on the decoder layers of `llm` (a transformers causal
    LM with the .model.{layers, norm, rotary_emb} layout), with the stages of `runner` (None: none)."""

    def __init__(self, llm: nn.Module, runner: StageRunner | None = None):
        from transformers import DynamicCache

        self.llm, self.runner, self.parts = llm, runner, LLMParts.of(llm)
        self.cache = DynamicCache(config=llm.config)
        params = inspect.signature(type(self.parts.layers[0]).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"   # renamed in transformers 5.x
        self.layer_masks: list[Tensor] = []       # per layer: [B, len] mask of what its cache holds
        self.keeps: list[Tensor] = []             # per stage: [B, K_s] original slots kept

    def _layer(self, i: int, x: Tensor, pos: Tensor, cos_sin, mask4: Tensor) -> Tensor:
        return self.parts.layers[i](x, attention_mask=mask4, position_ids=pos, use_cache=True,
                                    position_embeddings=cos_sin, **{self._cache_kw: self.cache})

    def _logits(self, x: Tensor, mask: Tensor) -> Tensor:
        """Logits of the last valid token of each row [B, V] float32 (right padding)."""
        last = (mask.sum(dim=1) - 1).clamp_min(0) if x.shape[1] > 1 else torch.zeros_like(mask[:, 0])
        return self.llm.lm_head(self.parts.norm(gather_rows(x, last.unsqueeze(1))))[:, 0].float()

    @torch.no_grad()
    def prefill(self, embeds: Tensor, position_ids: Tensor, attention_mask: Tensor,
                image_positions: Tensor | None = None) -> Tensor:
        """embeds [B, Lt, D], position_ids [B, Lt] / [3, B, Lt], attention_mask [B, Lt] (right padding),
        image_positions [B, K] (the slots' grid indices; needed with a runner) -> logits [B, V]."""
        x, pos, mask = embeds, position_ids, attention_mask
        state = None
        if self.runner is not None:
            state = PrefillState(hidden=x, layer_input=x, position_ids=pos, attention_mask=mask, presents=[],
                                 slots=self.runner.initial_slots(image_positions), image_positions=image_positions)
        cos_sin, mask4 = self.parts.rotary(x, pos), causal_mask(mask, x.shape[1], x.dtype)
        x_in = x
        for i in range(len(self.parts.layers)):
            if self.runner is not None and i in self.runner.layers:   # stage between layer i-1 and i
                presents = [t for j in range(i) for t in (self.cache.layers[j].keys, self.cache.layers[j].values)]
                state = self.runner.apply(i, PrefillState(hidden=x, layer_input=x_in, position_ids=pos,
                                                          attention_mask=mask, presents=presents, slots=state.slots,
                                                          image_positions=image_positions), self.parts)
                for j in range(i):
                    self.cache.layers[j].keys, self.cache.layers[j].values = state.presents[2 * j:2 * j + 2]
                    if self.runner.kv_policy == "uniform":
                        self.layer_masks[j] = state.attention_mask
                x, pos, mask = state.hidden, state.position_ids, state.attention_mask
                self.keeps.append(state.slots)
                cos_sin, mask4 = self.parts.rotary(x, pos), causal_mask(mask, x.shape[1], x.dtype)
            x_in = x
            x = self._layer(i, x, pos, cos_sin, mask4)
            self.layer_masks.append(mask)
        return self._logits(x, mask)

    @torch.no_grad()
    def step(self, embeds: Tensor, position_ids: Tensor) -> Tensor:
        """One decode token: embeds [B, 1, D], position_ids [B, 1] / [3, B, 1] -> logits [B, V]."""
        x = embeds
        cos_sin = self.parts.rotary(x, position_ids)
        ones = torch.ones(x.shape[0], 1, dtype=self.layer_masks[0].dtype)
        masks4 = {}
        for i in range(len(self.parts.layers)):
            self.layer_masks[i] = torch.cat([self.layer_masks[i], ones], dim=1)
            key = self.layer_masks[i].shape[1]            # layers of one KV group share a mask
            if key not in masks4:
                masks4[key] = causal_mask(self.layer_masks[i], 1, x.dtype)
            x = self._layer(i, x, position_ids, cos_sin, masks4[key])
        return self._logits(x, self.layer_masks[-1])

    @torch.no_grad()
    def last_attention(self, embeds: Tensor, position_ids: Tensor, attention_mask: Tensor, layer: int) -> Tensor:
        """A^(layer)[last valid token, :] [B, L] of the unpruned prefill (what an in-LLM stage at L = layer + 1
        reads; D2Pruner's calibration, `edgeprune calibrate --llm-layer`). Runs layers 0..layer only."""
        x, mask4 = embeds, causal_mask(attention_mask, embeds.shape[1], embeds.dtype)
        cos_sin = self.parts.rotary(x, position_ids)
        for i in range(layer + 1):
            x_in = x
            x = self._layer(i, x, position_ids, cos_sin, mask4)
        return last_token_attention(self.parts, layer, x_in, self.cache.layers[layer].keys, position_ids,
                                    attention_mask)
