"""Tiled images at a static layout, shared by LLaVA-NeXT (anyres), InternVL (dynamic tiling) and SmolVLM
(image splitting): V views of one vision-tower size S, each encoded alone into g_h x g_w tokens, plus
fixed tokens (LLaVA-NeXT's newline embedding, SmolVLM's row/column text markers) in one packed sequence.

The image is resized (no padding) to rows*S x cols*S pixels: the tiles are its S x S crops, row-major,
and the overview (LLaVA-NeXT's base view, InternVL's thumbnail, SmolVLM's global image) is the whole
image at S x S, a box (area) downsample inside the graph (exact, an AveragePool), where the processors
resize the original image: the one departure from them. The overview comes first (LLaVA-NeXT) or last
(InternVL, SmolVLM), and InternVL and SmolVLM have none when the image is one tile.

"positions" index the packed sequence of N = V * g_h * g_w + R tokens (R fixed tokens), so the 1-D
position modes (original / compact) work unchanged. Pruning (`TilePruner`): the R fixed tokens are
always kept and are part of K; the other K - R are split across the views in proportion to their token
counts (`split_budget`), and the chosen method runs on each view by itself (its own signals and grid).
"""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeprune.errors import ModelError
from edgeprune.models._vit import check_need
from edgeprune.models.base import ALL_SIGNALS, Signals
from edgeprune.models.vision_step import prune_and_project
from edgeprune.pruners.base import Selection
from edgeprune.pruners.ops import check_keep, sort_by_position

__all__ = ["split_budget", "TilePruner", "TiledMixin", "tile_grid", "check_tiles"]


def split_budget(keep: int, sizes: list[int]) -> list[int]:
    """K split across views proportionally to their token counts N_v (METHODS.md terms: each view gets a
    static budget K_v, sum K_v = K, 1 <= K_v <= N_v): K_v = floor(K * N_v / N) first (N = sum N_v), then
    the K - sum floor(...) leftover tokens go one each to the views with the largest remainders
    (K * N_v mod N), ties to the earlier view. Exact integer arithmetic."""
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


class TilePruner(nn.Module):
    """One method run per view with the K split of `split_budget`, plus the always-kept fixed tokens, in the
    packed order of the model. A `PrunerLike` (pruners/base.py): the exporter and the reference run it
    through the one vision step like any pruner; it is not registered because only the adapter knows the
    view layout. Each view goes through `prune_and_project` (models/vision_step.py) with an ordinary built
    pruner, so a view's tokens are exactly what that method gives on a single image; its output is already
    in the LLM's space (space = "tokens")."""

    space = "tokens"
    extra_outputs = ()

    def __init__(self, method: str, pruners: list[nn.Module], view_tokens: int, view_grid: tuple[int, int],
                 packed: list[list[int]], fixed_positions: list[int], fixed_tokens: Tensor, project):
        super().__init__()
        self.name = method
        self.pruners = nn.ModuleList(pruners)
        self.requires = pruners[0].requires
        self.default_positions = getattr(pruners[0], "default_positions", None)
        self.view_tokens, self.view_grid = view_tokens, tuple(view_grid)
        self.project = project
        self.register_buffer("packed", torch.tensor(packed, dtype=torch.int64), persistent=False)   # [V, g_h*g_w]
        self.register_buffer("fixed_positions", torch.tensor(fixed_positions, dtype=torch.int64).reshape(-1),
                             persistent=False)                                                    # [R]
        self.register_buffer("fixed_tokens", fixed_tokens.detach(), persistent=False)            # [R, D_llm]
        self.keep = sum(p.keep for p in pruners) + len(fixed_positions)

    def forward(self, *, tokens=None, feats=None, keys=None, attn=None, grid=None, pixels=None) -> Selection:
        given = {"tokens": tokens, "feats": feats, "keys": keys, "attn": attn}
        n = self.view_tokens
        kept_tokens, kept_positions = [], []
        for v, pruner in enumerate(self.pruners):
            view = {name: x[:, v * n:(v + 1) * n] for name, x in given.items() if x is not None}
            sel = prune_and_project(pruner, {**view, "grid": self.view_grid, "pixels": pixels}, self.project)
            kept_tokens.append(sel.tokens)                                  # [B, K_v, D_llm]
            kept_positions.append(self.packed[v][sel.positions])            # [B, K_v] from 0..n-1 to packed
        b = kept_tokens[0].shape[0]
        r = self.fixed_positions.shape[0]
        if r:
            kept_tokens.append(self.fixed_tokens.to(kept_tokens[0].dtype).unsqueeze(0).expand(b, r, -1))  # [B, R, D]
            kept_positions.append(self.fixed_positions.unsqueeze(0).expand(b, r))                         # [B, R]
        # views and fixed tokens interleave in the packed order: sort the K positions (TopK over K, never N)
        positions, tokens = sort_by_position(torch.cat(kept_positions, dim=1), torch.cat(kept_tokens, dim=1))
        return Selection(tokens=tokens, positions=positions)


class TiledMixin:
    """Tiling for an Adapter. The adapter sets `view_size` (S, px) and `view_grid` (g_h, g_w tokens per view) in
    __init__, and implements `_set_tiles(rows, cols)`, which sets `rows`, `cols`, `overview` ("first", "last" or
    None), `packed` (per view, the packed position of each of its tokens, in the view's own order) and
    `fixed_positions` [R]; `fixed_tokens()` -> [R, D_llm]; and `encode_views(views [B*V, 3, S, S], need) ->
    Signals` over single views."""

    view_size: int
    rows: int
    cols: int
    overview: str | None
    view_grid: tuple[int, int]
    packed: list[list[int]]
    fixed_positions: list[int]

    def fixed_tokens(self) -> Tensor:
        raise NotImplementedError

    def _set_tiles(self, rows: int, cols: int) -> None:
        raise NotImplementedError

    def with_image_size(self, size: tuple[int, int]):
        """This adapter (same modules, no copy of the weights) at input size (h, w), multiples of the tile size S:
        an (h/S) x (w/S) tile grid with its own N (`--image-size`, resolution buckets)."""
        h, w = int(size[0]), int(size[1])
        s = self.view_size
        if h < s or w < s or h % s or w % s:
            raise ModelError(f"{self.name}: image size {(h, w)} is not a positive multiple of the {s} px tile")
        other = copy.copy(self)   # shallow: the module dicts (weights) are shared
        other.preprocess_config = dataclasses.replace(self.preprocess_config, size=(h, w))
        other._set_tiles(h // s, w // s)
        other.check_tiling(self.name)
        return other

    def encode_views(self, views: Tensor, need: tuple[str, ...]) -> Signals:
        raise NotImplementedError

    @property
    def num_views(self) -> int:
        return self.rows * self.cols + (self.overview is not None)

    @property
    def view_tokens(self) -> int:
        return self.view_grid[0] * self.view_grid[1]

    @property
    def num_image_tokens(self) -> int:
        return self.num_views * self.view_tokens + len(self.fixed_positions)   # N of the packed sequence

    def check_tiling(self, name: str) -> None:
        """The packed layout covers 0..N-1 exactly once (an invariant of the subclass's layout)."""
        every = sorted([p for view in self.packed for p in view] + list(self.fixed_positions))
        assert every == list(range(self.num_image_tokens)), f"{name}: packed layout is not a permutation"
        assert len(self.packed) == self.num_views and all(len(v) == self.view_tokens for v in self.packed)

    def views(self, pixels: Tensor) -> Tensor:
        """[B, 3, rows*S, cols*S] -> [B * V, 3, S, S]: per image the tiles row-major, the overview first or last."""
        b = pixels.shape[0]
        s = self.view_size
        tiles = pixels.reshape(b, 3, self.rows, s, self.cols, s).permute(0, 2, 4, 1, 3, 5)  # [B, rows, cols, 3, S, S]
        parts = [tiles.reshape(b, self.rows * self.cols, 3, s, s)]
        if self.overview is not None:
            whole = F.avg_pool2d(pixels, kernel_size=(self.rows, self.cols)).unsqueeze(1)  # [B, 1, 3, S, S] box filter
            parts.insert(0 if self.overview == "first" else 1, whole)
        return torch.cat(parts, dim=1).reshape(b * self.num_views, 3, s, s)

    def check_pixels(self, pixels: Tensor) -> None:
        """Views [B*V, 3, S, S] (what `views` returns; the single-view encoders check what they are given)."""
        s = self.view_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ModelError(f"{self.family}: view pixels of shape {tuple(pixels.shape)}, expected [B*V, 3, {s}, {s}]")

    def encode(self, pixels: Tensor, need: tuple[str, ...] = ALL_SIGNALS) -> Signals:
        """Signals of the V views of each image, concatenated view after view: [B, V * g_h*g_w, ...]."""
        need = check_need(need)
        h, w = self.preprocess_config.size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, h, w):
            raise ModelError(f"{self.family}: pixels of shape {tuple(pixels.shape)}, expected [B, 3, {h}, {w}] "
                             "(use adapter.preprocess(images))")
        b = pixels.shape[0]
        inner = self.encode_views(self.views(pixels), tuple(n for n in need if n != "pixels"))
        out = Signals(grid=self.view_grid, pixels=pixels if "pixels" in need else None)
        for name in ("tokens", "feats", "keys", "attn"):
            x = getattr(inner, name)
            if x is not None:                                                  # [B*V, n, ...] -> [B, V*n, ...]
                setattr(out, name, x.reshape(b, self.num_views * x.shape[1], *x.shape[2:]))
        return out

    def unpruned(self, signals: Signals) -> tuple[Tensor, Tensor]:
        """The packed sequence with every token and fixed token (K = N: each view's method returns its input)."""
        sel = self.build_pruner("uniform", self.num_image_tokens)(**signals.as_kwargs())
        return sel.tokens, sel.positions

    def build_pruner(self, method: str, keep: int, **cfg) -> TilePruner:
        from edgeprune.pruners import available, build_for_model

        fixed = len(self.fixed_positions)
        check_keep(method, keep, self.num_image_tokens)
        if keep < fixed + self.num_views:
            kept = f"the {fixed} {self.fixed_name} tokens are always kept and " if fixed else ""
            raise ModelError(f"{method}: keep={keep} for {self.family} at {self.rows}x{self.cols} tiles: {kept}each of "
                             f"the {self.num_views} views keeps at least one token; expected keep >= "
                             f"{fixed + self.num_views}")
        if method in available() and available()[method].extra_outputs:
            raise ModelError(f"{method}: methods with extra graph outputs are not supported per view "
                             f"({self.family} runs the method once per tile)")
        shares = split_budget(keep - fixed, [self.view_tokens] * self.num_views)
        pruners = [build_for_model(method, k, self.pruner_options(), **cfg) for k in shares]
        return TilePruner(method, pruners, self.view_tokens, self.view_grid, self.packed, self.fixed_positions,
                          self.fixed_tokens(), self.project)

    fixed_name = "fixed"   # what the fixed tokens are, for messages ("newline", "marker")


def tile_grid(name: str, image_size: tuple[int, int], tile: int) -> tuple[int, int]:
    """(rows, cols) of S x S tiles that an image of `image_size` (h, w) px is cut into; both sides multiples of S."""
    h, w = image_size
    if h % tile or w % tile:
        raise ModelError(f"{name}: image size {(h, w)} is not a multiple of the {tile} px tile on both sides")
    return h // tile, w // tile


def check_tiles(name: str, tiles) -> tuple[int, int]:
    """(rows, cols) of a tile grid given by a user, both >= 1."""
    try:
        rows, cols = (int(v) for v in tiles)
    except (TypeError, ValueError):
        raise ModelError(f"{name}: tiles={tiles!r}; expected (rows, cols), two integers >= 1") from None
    if rows < 1 or cols < 1:
        raise ModelError(f"{name}: tiles={tiles!r}; expected (rows, cols), two integers >= 1")
    return rows, cols
