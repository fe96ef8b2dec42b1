"""Qwen2.5-VL family: transformers `Qwen2_5_VLForConditionalGeneration`. The Qwen2-VL adapter
(models/qwen2_vl.py: signals, merger, M-RoPE, fixed resolution) with the vision differences of 2.5:
RMSNorm and gated MLP (used through the blocks' own modules) and window attention.

Window attention without the reordering: transformers permutes the patches window by window
(get_vision_window_index), runs windowed blocks on cu_window_seqlens, and undoes the permutation
after the merger. Attention is permutation-equivariant, so we keep the patches in grid (merge-block)
order throughout and give each windowed block a boolean mask "same window" instead: the outputs are
the model's, and every signal (feats, keys, attn) is indexed by grid position with no permutation to
undo. A window is window_size // (patch * merge) merged tokens on a side, tiled from the top-left
(the last row/column of windows may be smaller, as transformers' padding makes them).
"""
from __future__ import annotations

import torch
from torch import Tensor

from edgeprune.models.qwen2_vl import TINY_IMAGE_SIZE, Qwen2VLAdapter, tiny_adapter, tiny_model

__all__ = ["Qwen2_5_VLAdapter", "tiny_qwen2_5_vl", "tiny_qwen2_5_vl_model"]


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Adapter over a `Qwen2_5_VLForConditionalGeneration` at a fixed input resolution."""

    family = "qwen2_5_vl"

    def __init__(self, model, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        vcfg = model.config.vision_config
        self.full_blocks = tuple(int(i) for i in vcfg.fullatt_block_indexes)
        self.window = int(vcfg.window_size) // (self.patch * self.merge)   # merged tokens per window side
        self._masks: dict[tuple[int, int], Tensor] = {}

    @staticmethod
    def hf_class():
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def _block_mask(self, index: int, patch_grid: tuple[int, int]) -> Tensor | None:
        if index in self.full_blocks:
            return None
        if patch_grid not in self._masks:
            gh, gw = patch_grid
            m = self.merge
            rows = torch.arange(gh // m).repeat_interleave(gw // m)            # merged row of merged token i
            cols = torch.arange(gw // m).repeat(gh // m)                       # merged column
            windows_per_row = -(-(gw // m) // self.window)
            window = (rows // self.window) * windows_per_row + cols // self.window   # [N]
            window = window.repeat_interleave(m * m).tolist()                  # [Np], merge-block patch order
            # a list -> tensor constant: the comparison is folded at export (a bool [Np, Np] in the graph)
            ids = torch.tensor(window)
            self._masks[patch_grid] = ids[:, None] == ids[None, :]             # [Np, Np] True = same window
        return self._masks[patch_grid]


def tiny_qwen2_5_vl_model(seed: int = 0, dtype: torch.dtype = torch.float32):
    """(Qwen2_5_VLForConditionalGeneration, tokenizer) of the "tiny-qwen2.5-vl" preset: vision 3 blocks,
    width 32, 4 heads, window 84 px (3 x 3 merged tokens; on the 6 x 8 grid the last window column is
    narrower), full attention in block 1 only (so the windowed path also feeds the last block's `attn`);
    the text model and tokenizer of tiny-qwen2-vl."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=84,
                  fullatt_block_indexes=[1], hidden_act="silu")
    return tiny_model(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, vision, seed, dtype)


def tiny_qwen2_5_vl(seed: int = 0, dtype: torch.dtype = torch.float32,
                    image_size: tuple[int, int] = TINY_IMAGE_SIZE) -> Qwen2_5_VLAdapter:
    """The "tiny-qwen2.5-vl" preset at a fixed `image_size` (multiples of 28). Same seed, same weights."""
    model, tokenizer = tiny_qwen2_5_vl_model(seed, dtype)
    return tiny_adapter(Qwen2_5_VLAdapter, model, tokenizer, image_size, "tiny-qwen2.5-vl")
