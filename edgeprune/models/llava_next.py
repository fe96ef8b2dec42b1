"""LLaVA-NeXT (anyres): transformers `LlavaNextForConditionalGeneration`, CLIP views + MLP projector +
a Llama-style LLM, with a static token layout so the vision graph has one N and one K.

Static anyres: the image is resized (no padding) to ONE chosen grid pinpoint (rows * S, cols * S),
S = the vision tower's image size. The views are the base view (the whole image at S x S) and the
rows x cols crops of S x S, row-major, each encoded like a LLaVA-1.5 image (g x g tokens, g = S / patch).
Because the image fills the pinpoint exactly, the model's unpad step removes nothing, and its packed
sequence is fixed:

    [base: g*g tokens] [crop grid (rows*g) x (cols*g), each of its rows followed by a newline token]

N = g*g + rows*g * (cols*g + 1) packed positions; "positions" index that packed sequence, so the
runtime's position modes (original / compact) work unchanged (1-D RoPE).
Departure from the processor: the base view is a box (area) downsample of the pinpoint-sized image
inside the graph (exact, an AveragePool), not a bicubic resize of the original image.

Pruning (models/_tiles.py, `TilePruner`): the R = rows*g newline tokens are always kept (they are part
of the budget: the LLM sees exactly K tokens, newlines as the model places them); the other K - R are
split across the views proportionally to their token counts (`split_budget`), and the chosen method
runs on each view by itself (its own signals, grid g x g), unchanged.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from edgeprune.errors import ModelError
from edgeprune.models._tiles import TiledMixin, split_budget
from edgeprune.models._vit import ClsViTAdapter
from edgeprune.models.base import Signals, load_hf_dir
from edgeprune.models.llava import CLIP_MEAN, CLIP_STD, LLAVA15_TEMPLATE, LlavaAdapter, split_template
from edgeprune.runtime.preprocess import PreprocessConfig

__all__ = ["LlavaNextAdapter", "split_budget", "tiny_llava_next", "tiny_llava_next_model"]


class LlavaNextAdapter(TiledMixin, LlavaAdapter):
    """Adapter over a `LlavaNextForConditionalGeneration` at one fixed pinpoint (module docstring)."""

    family = "llava_next"
    fixed_name = "newline"

    def __init__(self, model, tokenizer, preprocess_config: PreprocessConfig, chat_template, eos_token_ids,
                 name: str = "llava_next"):
        super().__init__(model, tokenizer, preprocess_config, chat_template, eos_token_ids, name=name)
        size = model.config.vision_config.image_size
        h, w = preprocess_config.size
        if h % size or w % size:
            raise ModelError(f"{name}: pinpoint {(h, w)} is not a multiple of the vision tower's {size} px")
        self.view_size = size
        self.view_grid = self.grid                                              # view grid g x g
        self.newline = model.model.image_newline                              # [D_llm]
        self._set_tiles(h // size, w // size)
        self.check_tiling(name)

    def _set_tiles(self, rows: int, cols: int) -> None:
        self.rows, self.cols, self.overview = rows, cols, "first"               # the base view first
        g = self.grid[0]
        base = g * g
        line = cols * g + 1                                                     # packed length of a crop-grid row
        packed = [list(range(base))]
        for i in range(rows):
            for j in range(cols):
                packed.append([base + (i * g + r) * line + j * g + c for r in range(g) for c in range(g)])
        self.packed = packed
        self.fixed_positions = self.newline_positions = [base + row * line + cols * g for row in range(rows * g)]

    def fixed_tokens(self) -> Tensor:
        return self.newline.reshape(1, -1).expand(len(self.newline_positions), -1)   # [R, D_llm]

    def encode_views(self, views: Tensor, need: tuple[str, ...]) -> Signals:
        return ClsViTAdapter.encode(self, views, need)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, chat_template: str | None = None,
                        pinpoint: tuple[int, int] | None = None) -> "LlavaNextAdapter":
        """A local LLaVA-NeXT directory at one grid pinpoint (h, w) (default: the config's first)."""
        from transformers import LlavaNextForConditionalGeneration

        path = Path(path)
        model, tokenizer, eos = load_hf_dir(LlavaNextForConditionalGeneration, path, "LLaVA-NeXT", dtype)
        pinpoint = tuple(pinpoint or model.config.image_grid_pinpoints[0])
        pre = PreprocessConfig(size=pinpoint, mean=CLIP_MEAN, std=CLIP_STD, shortest_edge=None, resample="bicubic")
        return cls(model, tokenizer, pre, split_template(chat_template or LLAVA15_TEMPLATE), eos, name=str(path))


def tiny_llava_next_model(seed: int = 0, dtype: torch.dtype = torch.float32):
    """(LlavaNextForConditionalGeneration, tokenizer) of "tiny-llava-next": CLIP 112 px / patch 14
    (8 x 8 tokens per view), pinpoint 224 x 224 (2 x 2 crops), the tiny-llava LLM and tokenizer."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    from edgeprune.models.tiny import seeded_model, tiny_llava_configs

    tokenizer, vision, text, image = tiny_llava_configs(112)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image,
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_grid_pinpoints=[[224, 224]])
    return seeded_model(LlavaNextForConditionalGeneration, config, seed, dtype), tokenizer


def tiny_llava_next(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlavaNextAdapter:
    """The "tiny-llava-next" preset: N = 64 + 16 * 17 = 336 packed positions (5 views, 16 newlines)."""
    model, tokenizer = tiny_llava_next_model(seed, dtype)
    pre = PreprocessConfig(size=(224, 224), mean=CLIP_MEAN, std=CLIP_STD, shortest_edge=None, resample="bicubic")
    return LlavaNextAdapter(model, tokenizer, pre, split_template(LLAVA15_TEMPLATE),
                            (tokenizer.token_to_id("</s>"),), name="tiny-llava-next")
