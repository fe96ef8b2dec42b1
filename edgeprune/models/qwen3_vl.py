"""Qwen3-VL: transformers `Qwen3VLForConditionalGeneration`. The Qwen2-VL adapter (models/qwen2_vl.py: fixed
resolution, signals on the merged 2 x 2 grid, M-RoPE ids) with Qwen3-VL's differences:

- Vision: patch 16 (a 32 px merge unit), a patch-embedding bias, learned position embeddings bilinearly
  resampled to the patch grid (transformers' own interpolation indices and weights, computed once per grid:
  constants in the graph), LayerNorm blocks with a GELU MLP (run through the blocks' own modules), and a
  merger whose LayerNorm acts per patch before the 2 x 2 concatenation.
- M-RoPE: the text rotary interleaves the (t, h, w) sections over the frequencies instead of Qwen2-VL's
  contiguous chunks (Qwen3VLTextRotaryEmbedding.recomposition_frequencies). The position ids are the same
  (runtime/positions.py: image token (s, s + row, s + col), text after from s + max(H, W)); the rotary
  module turns them into cos/sin, so the exported decoder replays it unchanged.
- DeepStack: the outputs of vision blocks `deepstack_visual_indexes` (L of them), each through its own
  merger (LayerNorm over the 4 concatenated patches), are added to the LLM's residual stream at the image
  positions after decoder layers 0..L-1. Pruning keeps exactly the DeepStack features of the kept tokens:
  the blocks' outputs travel as `Signals.carry` [B, N, L, 4C] (merge groups concatenated like `feats`) and
  go through the same gather or merge the pruner applied (Selection.weights, in the pruner's space: a
  token merged by visionzip / dpc / polymorphic gets the same weighted mean of its DeepStack features,
  before their mergers as for `feats`), then the DeepStack mergers. The vision graph outputs them as
  `deepstack_tokens` [B, K, L, D]; the decoder takes `deepstack_embeds` [B, S, L, D] (zeros at text
  positions and in decode steps) and adds slice i after layer i (export/llm.py).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from edgeprune.models.base import Signals
from edgeprune.models.qwen2_vl import Qwen2VLAdapter, Qwen2VLTextLM, tiny_adapter, tiny_model
from edgeprune.pruners.ops import apply_selection

__all__ = ["Qwen3VLAdapter", "Qwen3VLTextLM", "tiny_qwen3_vl", "tiny_qwen3_vl_model", "TINY_IMAGE_SIZE"]

TINY_IMAGE_SIZE = (192, 256)   # patch grid 12 x 16 -> merged grid 6 x 8, N = 48


class Qwen3VLTextLM(Qwen2VLTextLM):
    """The Qwen3-VL text model + lm_head as a causal LM, with DeepStack: `deepstack_embeds` [B, S, L, D] (zeros
    where nothing is added) goes to the text model's own DeepStack code (a mask of every position: adding the
    zeros at text positions changes nothing)."""

    def __init__(self, text_config, language_model: nn.Module, lm_head: nn.Module, deepstack_layers: int):
        super().__init__(text_config, language_model, lm_head)
        self.deepstack_layers = deepstack_layers

    def forward(self, inputs_embeds: Tensor, position_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                cache=None, use_cache: bool | None = None, logits_to_keep: int = 0,
                deepstack_embeds: Tensor | None = None):
        extra = {}
        if deepstack_embeds is not None:
            b, s, layers, d = deepstack_embeds.shape
            extra = {"visual_pos_masks": torch.ones(b, s, dtype=torch.bool),
                     "deepstack_visual_embeds": [deepstack_embeds[:, :, i].reshape(b * s, d) for i in range(layers)]}
        return self._run(inputs_embeds, position_ids, attention_mask, cache, use_cache, logits_to_keep, extra)


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Adapter over a `Qwen3VLForConditionalGeneration` at a fixed input resolution (module docstring)."""

    family = "qwen3_vl"

    def __init__(self, model, *args, **kwargs):
        vcfg = model.config.vision_config
        self.deepstack_index = tuple(int(i) for i in vcfg.deepstack_visual_indexes)
        self.deepstack_layers = len(self.deepstack_index)
        self._pos_embed: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        super().__init__(model, *args, **kwargs)
        self.deepstack_mergers = self.visual.deepstack_merger_list

    def text_lm(self, text_config, language_model, lm_head) -> Qwen3VLTextLM:
        return Qwen3VLTextLM(text_config, language_model, lm_head, self.deepstack_layers)

    @staticmethod
    def hf_class():
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration

    # -- vision ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def pos_embed_taps(self, patch_grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """(indices, weights) [Np, 4] resampling the learned position table to `patch_grid`, in merge-block
        order: transformers' own bilinear taps (Qwen3VLVisionModel.forward's arguments)."""
        if patch_grid not in self._pos_embed:
            from transformers.vision_utils import get_vision_interpolation_indices_and_weights

            visual = self.visual
            self._pos_embed[patch_grid] = get_vision_interpolation_indices_and_weights(
                torch.tensor([[1, *patch_grid]]), num_grid_per_side=visual.num_grid_per_side,
                mode=visual.interpolation_mode, align_corners=visual.interpolation_align_corners,
                spatial_merge_size=self.merge)
        return self._pos_embed[patch_grid]

    def _patch_embed(self, pixels: Tensor) -> Tensor:
        x = super()._patch_embed(pixels)                                          # [B, Np, C]
        index, weight = self.pos_embed_taps((pixels.shape[2] // self.patch, pixels.shape[3] // self.patch))
        pos = (self.visual.pos_embed(index) * weight[:, :, None].to(x.dtype)).sum(dim=1)   # [Np, C]
        return x + pos.to(x.dtype)

    def _merge(self, merger: nn.Module, feats: Tensor) -> Tensor:
        """[B, M, 4C] -> [B, M, D_llm] through a Qwen3VLVisionPatchMerger (its norm per patch or per group)."""
        b, m, width = feats.shape
        if merger.use_postshuffle_norm:
            x = merger.norm(feats)
        else:
            x = merger.norm(feats.reshape(b, m, self.merge ** 2, -1)).reshape(b, m, width)
        return merger.linear_fc2(merger.act_fn(merger.linear_fc1(x)))

    def project(self, feats: Tensor) -> Tensor:
        return self._merge(self.visual.merger, feats)

    def project_deepstack(self, carry: Tensor) -> Tensor:
        """[B, M, L, 4C] tapped features -> [B, M, L, D_llm], each layer through its own DeepStack merger."""
        return torch.stack([self._merge(merger, carry[:, :, i]) for i, merger in enumerate(self.deepstack_mergers)],
                           dim=2)

    def deepstack(self, signals: Signals, selection, pruner) -> Tensor:
        space = getattr(pruner, "space", "tokens") if pruner is not None else "tokens"
        if selection.weights is not None and space == "tokens":   # a merge of projected tokens: merge projected
            return apply_selection(selection, self.project_deepstack(signals.carry))
        # a gather (commutes with the per-token mergers), or a merge of `feats`: same weights before the mergers
        return self.project_deepstack(apply_selection(selection, signals.carry))   # [B, K, L, D_llm]


def tiny_qwen3_vl_model(seed: int = 0, dtype: torch.dtype = torch.float32):
    """(Qwen3VLForConditionalGeneration, tokenizer) of the "tiny-qwen3-vl" preset: vision 3 blocks, width 32,
    4 heads, patch 16, merge 2, a learned 8 x 8 position table, DeepStack taps after blocks 0 and 1 (added after
    LLM layers 0 and 1); LLM 2 layers, hidden 64, 4 heads / 2 KV heads, head_dim 16, q/k norms, interleaved
    mrope_section [2, 3, 3]; the tokenizer of tiny-qwen2-vl; seeded random weights."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1], hidden_act="gelu_pytorch_tanh")
    return tiny_model(Qwen3VLConfig, Qwen3VLForConditionalGeneration, vision, seed, dtype,
                      text={"head_dim": 16})


def tiny_qwen3_vl(seed: int = 0, dtype: torch.dtype = torch.float32,
                  image_size: tuple[int, int] = TINY_IMAGE_SIZE) -> Qwen3VLAdapter:
    """The "tiny-qwen3-vl" preset at a fixed `image_size` (multiples of 32). Same seed, same weights."""
    model, tokenizer = tiny_qwen3_vl_model(seed, dtype)
    return tiny_adapter(Qwen3VLAdapter, model, tokenizer, image_size, "tiny-qwen3-vl")
