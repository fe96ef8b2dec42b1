"""Signals from a ViT with a [CLS] token (CLIP, DINOv2), shared by the adapters of this package.

`encode` runs the encoder only up to the layer that produces `feats` (layers after it are never
run) and computes `keys` and `attn` from that layer's input with plain tensor ops, so the encoder
keeps its sdpa attention (NOTES.md: `output_attentions` with sdpa returns None) and the same code
traces to ONNX. No Python branching on tensor values: only on `need`, which is static.
"""
from __future__ import annotations

from torch import Tensor, nn

from edgeprune.errors import ModelError
from edgeprune.models.base import ALL_SIGNALS, Adapter, Signals

__all__ = ["ClsViTAdapter", "check_need", "shuffle_groups"]


def check_need(need) -> tuple[str, ...]:
    if isinstance(need, str):
        need = (need,)
    need = tuple(need)
    unknown = [n for n in need if n not in ALL_SIGNALS]
    if unknown:
        raise ModelError(f"encode: unknown signal(s) {', '.join(map(repr, unknown))}; "
                         f"expected some of {', '.join(ALL_SIGNALS)}")
    return need


def shuffle_groups(x: Tensor, grid: tuple[int, int], scale: int) -> Tensor:
    """Pixel-shuffle grouping of per-patch values x [B, H*W, X] (row-major grid H x W) into the merged
    tokens of a scale x scale pixel shuffle: [B, (H/s)*(W/s), s*s, X], merged tokens row-major and the s*s
    patches of each in (row, column) order, which is the channel order of InternVL's and SmolVLM's
    pixel_shuffle (flattening the last two axes gives their [B, N, s*s*X] features)."""
    b, _, c = x.shape
    h, w = grid
    x = x.reshape(b, h // scale, scale, w // scale, scale, c).permute(0, 1, 3, 2, 4, 5)  # [B, H/s, W/s, s, s, X]
    return x.reshape(b, (h // scale) * (w // scale), scale * scale, c)


class ClsViTAdapter(Adapter):
    """Adapter base for encoders with a [CLS] token at index 0 and pre-norm layers.

    Subclasses implement `_embed(pixels) -> [B, 1+N, C]` (everything before the first layer),
    `_layers()` (the encoder layers, run by `_run_layer`, by default `layer(hidden, None)`),
    `_attn_parts(layer)` -> (pre-attention norm, q projection, k projection, heads, scale), and set
    `feature_layer`, the 0-based index of the layer whose output (without [CLS], through
    `_feature_norm`) is `feats`.
    """

    feature_layer: int
    num_views: int = 1   # encoder passes per image (LLaVA-NeXT: base view + crops)

    def vision_facts(self) -> dict:
        layers = self._layers()
        width = self._attn_parts(layers[0])[0].weight.shape[0]   # the pre-attention norm: the residual stream
        return {"num_layers": len(layers), "hidden_size": int(width),
                "tokens_per_view": self.grid[0] * self.grid[1] + 1, "views": int(self.num_views)}  # +1: [CLS]

    def _embed(self, pixels: Tensor) -> Tensor:
        raise NotImplementedError

    def _layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def _attn_parts(self, layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, int, float]:
        raise NotImplementedError

    def _run_layer(self, layer: nn.Module, hidden: Tensor) -> Tensor:
        return layer(hidden, None)

    def _feature_norm(self, feats: Tensor) -> Tensor:
        """A norm the model applies to `feats` after the feature layer (none for CLIP's layer -2)."""
        return feats

    def encode(self, pixels: Tensor, need: tuple[str, ...] = ALL_SIGNALS) -> Signals:
        need = check_need(need)
        self.check_pixels(pixels)
        layers = self._layers()
        hidden = self._embed(pixels)                                      # [B, 1+N, C]
        for layer in layers[:self.feature_layer]:
            hidden = self._run_layer(layer, hidden)
        out = Signals(grid=self.grid, pixels=pixels if "pixels" in need else None)
        if "feats" in need or "tokens" in need:
            feats = self._feature_norm(self._run_layer(layers[self.feature_layer], hidden)[:, 1:])  # [B, N, C] no [CLS]
            out.feats = feats if "feats" in need else None
            out.tokens = self.project(feats) if "tokens" in need else None  # [B, N, D_llm]
        if "keys" in need or "attn" in need:
            out.keys, out.attn = self._keys_attn(layers[self.feature_layer], hidden, need)
        return out

    def _keys_attn(self, layer: nn.Module, hidden: Tensor, need: tuple[str, ...]):
        """Head-mean keys [B, N, hd] and [CLS]-to-patch attention summed over heads [B, N] of `layer`,
        recomputed from its input `hidden` [B, 1+N, C] exactly as the layer computes them."""
        norm, q_proj, k_proj, heads, scale = self._attn_parts(layer)
        b, t, _ = hidden.shape
        x = norm(hidden)                                                  # [B, 1+N, C]
        k = k_proj(x).reshape(b, t, heads, -1)                            # [B, 1+N, H, hd]
        keys = k.mean(dim=2)[:, 1:] if "keys" in need else None           # [B, N, hd]
        attn = None
        if "attn" in need:
            q = q_proj(x[:, :1]).reshape(b, 1, heads, -1)                 # [B, 1, H, hd] query of [CLS]
            scores = (q * k).sum(dim=-1) * scale                          # [B, 1+N, H]
            # softmax over all 1+N keys ([CLS] column included, as in the layer), then drop [CLS]
            attn = scores.softmax(dim=1).sum(dim=2)[:, 1:]                # [B, N]
        return keys, attn
