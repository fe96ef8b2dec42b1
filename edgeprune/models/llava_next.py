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

Pruning (`build_pruner` -> `ViewPruner`): the R = rows*g newline tokens are always kept (they are part
of the budget: the LLM sees exactly K tokens, newlines as the model places them); the other K - R are
split across the views proportionally to their token counts (`split_budget`), and the chosen method
runs on each view by itself (its own signals, grid g x g), unchanged.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeprune.errors import ModelError
from edgeprune.models._vit import ClsViTAdapter, check_need
from edgeprune.models.base import ALL_SIGNALS, Signals, load_hf_dir
from edgeprune.models.vision_step import prune_and_project
from edgeprune.models.llava import CLIP_MEAN, CLIP_STD, LLAVA15_TEMPLATE, LlavaAdapter, split_template
from edgeprune.pruners.base import Selection
from edgeprune.pruners.ops import check_keep, sort_by_position
from edgeprune.runtime.preprocess import PreprocessConfig

__all__ = ["LlavaNextAdapter", "ViewPruner", "split_budget", "tiny_llava_next", "tiny_llava_next_model"]


def split_budget(keep: int, sizes: list[int]) -> list[int]:
    """K split across views proportionally to their token counts N_v (METHODS.md terms: each view gets a
    static budget K_v, sum K_v = K, 1 <= K_v <= N_v): K_v = floor(K * N_v / N) first (N = sum N_v), then
    the K - sum floor(...) leftover tokens go one each to the views with the largest remainders
    (K * N_v mod N), ties to the earlier view (the base view first). Exact integer arithmetic."""
    total = sum(sizes)
    if not len(sizes) <= keep <= total:
        raise ModelError(f"split_budget: keep={keep} for {len(sizes)} views of {total} tokens; expected "
                         f"{len(sizes)} <= keep <= {total} (every view keeps at least one token)")
    shares = [keep * n // total for n in sizes]
    order = sorted(range(len(sizes)), key=lambda v: (-(keep * sizes[v] % total), v))
    for v in order[:keep - sum(shares)]:
        shares[v] += 1
    for v, (k, n) in enumerate(zip(shares, sizes)):   # a floor share of 0 gets 1 from the leftovers unless
        if not 1 <= k <= n:                           # K is tiny; refuse rather than drop a view silently
            raise ModelError(f"split_budget: view {v} gets {k} of its {n} tokens at keep={keep}; "
                             f"raise keep so every view keeps at least one token")
    return shares


class ViewPruner(nn.Module):
    """One method run per view with the K split of `split_budget`, plus the always-kept newline tokens,
    in the packed order of the model. A `PrunerLike` (pruners/base.py): the exporter and the reference run
    it through the one vision step like any pruner; it is not registered because only the adapter knows
    the view layout. Each view goes through `prune_and_project` (models/vision_step.py) with an ordinary
    built pruner, so a view's tokens are exactly what that method gives on a single image; its output is
    already in the LLM's space (space = "tokens")."""

    space = "tokens"
    extra_outputs = ()

    def __init__(self, method: str, pruners: list[nn.Module], view_tokens: int, view_grid: tuple[int, int],
                 packed: list[list[int]], newline_positions: list[int], newline: nn.Parameter, project):
        super().__init__()
        self.name = method
        self.pruners = nn.ModuleList(pruners)
        self.requires = pruners[0].requires
        self.default_positions = getattr(pruners[0], "default_positions", None)
        self.view_tokens, self.view_grid = view_tokens, tuple(view_grid)
        self.newline, self.project = newline, project
        self.register_buffer("packed", torch.tensor(packed, dtype=torch.int64), persistent=False)        # [V, g*g]
        self.register_buffer("newline_positions", torch.tensor(newline_positions, dtype=torch.int64),
                             persistent=False)                                                        # [R]
        self.keep = sum(p.keep for p in pruners) + len(newline_positions)

    def forward(self, *, tokens=None, feats=None, keys=None, attn=None, grid=None, pixels=None) -> Selection:
        given = {"tokens": tokens, "feats": feats, "keys": keys, "attn": attn}
        n = self.view_tokens
        kept_tokens, kept_positions = [], []
        for v, pruner in enumerate(self.pruners):
            view = {name: x[:, v * n:(v + 1) * n] for name, x in given.items() if x is not None}
            sel = prune_and_project(pruner, {**view, "grid": self.view_grid, "pixels": pixels}, self.project)
            kept_tokens.append(sel.tokens)                                  # [B, K_v, D_llm]
            kept_positions.append(self.packed[v][sel.positions])            # [B, K_v] from 0..g*g-1 to packed
        b = kept_tokens[0].shape[0]
        r = self.newline_positions.shape[0]
        lines = self.newline.to(kept_tokens[0].dtype).reshape(1, 1, -1).expand(b, r, -1)   # [B, R, D_llm]
        line_pos = self.newline_positions.unsqueeze(0).expand(b, r)                       # [B, R]
        # the base view's positions all precede the crops'; crops + newlines interleave: sort them (TopK over K)
        crop_pos, crop_tok = sort_by_position(torch.cat([*kept_positions[1:], line_pos], dim=1),
                                              torch.cat([*kept_tokens[1:], lines], dim=1))
        return Selection(tokens=torch.cat([kept_tokens[0], crop_tok], dim=1),
                         positions=torch.cat([kept_positions[0], crop_pos], dim=1))


class LlavaNextAdapter(LlavaAdapter):
    """Adapter over a `LlavaNextForConditionalGeneration` at one fixed pinpoint (module docstring)."""

    family = "llava_next"

    def __init__(self, model, tokenizer, preprocess_config: PreprocessConfig, chat_template, eos_token_ids,
                 name: str = "llava_next"):
        super().__init__(model, tokenizer, preprocess_config, chat_template, eos_token_ids, name=name)
        size = model.config.vision_config.image_size
        h, w = preprocess_config.size
        if h % size or w % size:
            raise ModelError(f"{name}: pinpoint {(h, w)} is not a multiple of the vision tower's {size} px")
        self.view_size = size
        self.rows, self.cols = h // size, w // size
        self.newline = model.model.image_newline                              # [D_llm]
        g = self.grid[0]                                                        # view grid g x g
        base = g * g
        line = self.cols * g + 1                                               # packed length of a crop-grid row
        packed = [list(range(base))]
        for i in range(self.rows):
            for j in range(self.cols):
                packed.append([base + (i * g + r) * line + j * g + c for r in range(g) for c in range(g)])
        self.packed = packed
        self.newline_positions = [base + row * line + self.cols * g for row in range(self.rows * g)]
        self.packed_tokens = base + self.rows * g * line

    @property
    def num_image_tokens(self) -> int:
        return self.packed_tokens                                              # N of the packed sequence

    @property
    def num_views(self) -> int:
        return 1 + self.rows * self.cols

    def views(self, pixels: Tensor) -> Tensor:
        """[B, 3, rows*S, cols*S] -> [B * V, 3, S, S]: per image the base view, then the crops row-major."""
        b = pixels.shape[0]
        s = self.view_size
        base = F.avg_pool2d(pixels, kernel_size=(self.rows, self.cols))         # [B, 3, S, S] box downsample
        crops = pixels.reshape(b, 3, self.rows, s, self.cols, s).permute(0, 2, 4, 1, 3, 5)  # [B, rows, cols, 3, S, S]
        crops = crops.reshape(b, self.rows * self.cols, 3, s, s)
        return torch.cat([base.unsqueeze(1), crops], dim=1).reshape(b * self.num_views, 3, s, s)

    def check_pixels(self, pixels: Tensor) -> None:   # called by ClsViTAdapter.encode on the views
        s = self.view_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ModelError(f"{self.family}: view pixels of shape {tuple(pixels.shape)}, expected [B*V, 3, {s}, {s}]")

    def encode(self, pixels: Tensor, need: tuple[str, ...] = ALL_SIGNALS) -> Signals:
        """Signals of the V views of each image, concatenated view after view: [B, V * g*g, ...]."""
        need = check_need(need)
        h, w = self.preprocess_config.size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, h, w):
            raise ModelError(f"{self.family}: pixels of shape {tuple(pixels.shape)}, expected [B, 3, {h}, {w}] "
                             "(use adapter.preprocess(images))")
        b = pixels.shape[0]
        inner = ClsViTAdapter.encode(self, self.views(pixels), tuple(n for n in need if n != "pixels"))
        out = Signals(grid=self.grid, pixels=pixels if "pixels" in need else None)
        for name in ("tokens", "feats", "keys", "attn"):
            x = getattr(inner, name)
            if x is not None:                                                  # [B*V, g*g, ...] -> [B, V*g*g, ...]
                setattr(out, name, x.reshape(b, self.num_views * x.shape[1], *x.shape[2:]))
        return out

    def unpruned(self, signals: Signals) -> tuple[Tensor, Tensor]:
        """The packed sequence with every token and newline (K = N: each view's method returns its input)."""
        sel = self.build_pruner("uniform", self.num_image_tokens)(**signals.as_kwargs())
        return sel.tokens, sel.positions

    def build_pruner(self, method: str, keep: int, **cfg) -> ViewPruner:
        from edgeprune.pruners import available, build_for_model

        lines = len(self.newline_positions)
        view_tokens = self.grid[0] * self.grid[1]
        check_keep(method, keep, self.num_image_tokens)
        if keep <= lines:
            raise ModelError(f"{method}: keep={keep} for LLaVA-NeXT at {self.rows}x{self.cols} crops: the {lines} newline "
                             f"tokens are always kept, expected keep > {lines}")
        if method in available() and available()[method].extra_outputs:
            raise ModelError(f"{method}: methods with extra graph outputs are not supported per view "
                             f"(LLaVA-NeXT runs the method once per view)")
        shares = split_budget(keep - lines, [view_tokens] * self.num_views)
        pruners = [build_for_model(method, k, self.pruner_options(), **cfg) for k in shares]
        return ViewPruner(method, pruners, view_tokens, self.grid, self.packed, self.newline_positions,
                          self.newline, self.project)

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
