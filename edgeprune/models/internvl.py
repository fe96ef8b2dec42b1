"""InternVL3 / 3.5: transformers `InternVLForConditionalGeneration` (InternViT with [CLS] and layer scale,
pixel shuffle 0.5, an MLP projector, a Qwen2.5 / Qwen3 LLM), loaded from a local directory or built by
the "tiny-internvl" preset.

Static dynamic tiling (models/_tiles.py): the image is resized to one tile grid of rows x cols tiles of
S = 448 px (the vision tower's image size), each tile is encoded alone, and when there is more than one
tile a thumbnail (the whole image at S x S) follows them, as InternVL's processor lays them out. Each view
gives (S/14/2)^2 = 256 tokens; the tiles' tokens are contiguous in the prompt ("<img>" + tokens + "</img>",
no markers between tiles), so N = V * 256 and "positions" index that sequence (1-D RoPE). The budget is
split across the views as for LLaVA-NeXT (no fixed tokens here).

Signals, per view, on the merged grid of the pixel shuffle (merged token i = r * W + c is made of the
2 x 2 patches (2r + dr, 2c + dc)):
- `feats` [B, N, 4C]: the feature layer's patches after the pixel shuffle (the projector's input; the 4
  patches in (dr, dc) order, as InternVL's pixel_shuffle orders channels); `project` = the projector
  (LayerNorm over 4C, MLP), so merged (averaged) feats still project as the model does.
- `tokens` = project(feats).
- `keys` [B, N, hd]: head-mean keys of the feature layer (after InternViT's k_norm when it has one),
  averaged over the 2 x 2 patches of each merged token.
- `attn` [B, N]: InternViT keeps its [CLS] token, so this is the [CLS]-to-patch attention of the feature
  layer (softmax over [CLS] + patches, summed over heads), averaged over the 2 x 2 patches: the mean
  attention a merged token's patches receive from [CLS]. (Qwen2-VL, which has no [CLS], averages the
  mean received attention the same way.)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from edgeprune.errors import ModelError
from edgeprune.models._tiles import TiledMixin, check_tiles, tile_grid
from edgeprune.models._vit import ClsViTAdapter, shuffle_groups
from edgeprune.models.base import Signals, load_hf_dir
from edgeprune.models.llava import causal_lm_from_parts, split_template
from edgeprune.runtime.preprocess import PreprocessConfig
from edgeprune.runtime.prompt import ChatTemplate

__all__ = ["InternVLAdapter", "tiny_internvl", "tiny_internvl_model", "INTERNVL_TEMPLATE", "IMAGE_CONTEXT"]

IMAGE_CONTEXT = "<IMG_CONTEXT>"
# the image block is "<img>" + tokens + "</img>"; the system prompt is the model's chat template's business
INTERNVL_TEMPLATE = ("<|im_start|>user\n<img><IMG_CONTEXT></img>\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_TILES = (2, 2)   # + thumbnail: 5 views, 1280 tokens at 448 px


class InternVLAdapter(TiledMixin, ClsViTAdapter):
    """Adapter over an `InternVLForConditionalGeneration` at one fixed tile grid (module docstring)."""

    family = "internvl"
    default_positions = "compact"

    def __init__(self, model, tokenizer, preprocess_config: PreprocessConfig, chat_template: ChatTemplate,
                 eos_token_ids: tuple[int, ...], name: str = "internvl"):
        super().__init__()
        cfg = model.config
        vcfg = cfg.vision_config
        if not isinstance(cfg.vision_feature_layer, int):
            raise ModelError(f"{name}: vision_feature_layer={cfg.vision_feature_layer!r} (multi-layer features) "
                             "is not supported")
        if cfg.vision_feature_select_strategy != "default":
            raise ModelError(f"{name}: vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}; "
                             "only 'default' (drop [CLS]) is supported")
        inverse = 1 / float(cfg.downsample_ratio)
        if inverse != round(inverse):
            raise ModelError(f"{name}: downsample_ratio={cfg.downsample_ratio}; expected 1/integer (0.5 in InternVL3)")
        self.scale = int(round(inverse))
        size, patch = int(vcfg.image_size[0]), int(vcfg.patch_size[0])
        if tuple(vcfg.image_size) != (size, size) or tuple(vcfg.patch_size) != (patch, patch):
            raise ModelError(f"{name}: non-square image_size {vcfg.image_size} / patch_size {vcfg.patch_size}")
        side = size // patch
        if side % self.scale:
            raise ModelError(f"{name}: {side} patches per side are not divisible by the pixel shuffle {self.scale}")
        rows, cols = tile_grid(name, preprocess_config.size, size)
        num_layers = vcfg.num_hidden_layers
        layer = cfg.vision_feature_layer
        hidden_index = layer if layer >= 0 else num_layers + 1 + layer   # into hidden_states (0 = embeddings)
        if not 1 <= hidden_index <= num_layers:
            raise ModelError(f"{name}: vision_feature_layer={layer} outside the {num_layers}-layer encoder")
        self.name = name
        self.config = cfg
        self.vision = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.llm = causal_lm_from_parts(cfg.text_config, model.model.language_model, model.lm_head)
        self.feature_layer = hidden_index - 1
        # InternVLModel applies the tower's final norm (an Identity with mean pooling) only to layer -1
        self.post_norm = self.vision.layernorm if layer == -1 else nn.Identity()
        self.patch_grid = (side, side)
        self.view_size, self.view_grid = size, (side // self.scale, side // self.scale)
        self.grid = self.view_grid
        self._set_tiles(rows, cols)
        self.check_tiling(name)
        self.tokenizer = tokenizer
        self.preprocess_config = preprocess_config
        self.chat_template = chat_template
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        self.eval()

    def _set_tiles(self, rows: int, cols: int) -> None:
        self.rows, self.cols = rows, cols
        self.overview = "last" if rows * cols > 1 else None                  # the thumbnail, after the tiles
        n = self.view_tokens
        self.packed = [list(range(v * n, (v + 1) * n)) for v in range(self.num_views)]   # contiguous views
        self.fixed_positions = []

    def fixed_tokens(self) -> Tensor:
        return torch.zeros(0, self.llm.config.hidden_size)

    # -- ClsViTAdapter hooks (one tile) --------------------------------------------------------------------
    def _embed(self, pixels: Tensor) -> Tensor:
        # the tower's own embeddings, without its position-table interpolation: tiles are always its size
        emb = self.vision.embeddings
        x = emb.patch_embeddings.projection(pixels.to(emb.patch_embeddings.projection.weight.dtype))
        x = x.flatten(2).transpose(1, 2)                                        # [B, Np, C]
        x = torch.cat([emb.cls_token.expand(x.shape[0], -1, -1), x], dim=1)    # [B, 1+Np, C]
        return x + emb.position_embeddings if emb.position_embeddings is not None else x

    def _layers(self) -> nn.ModuleList:
        return self.vision.encoder.layer

    def _run_layer(self, layer: nn.Module, hidden: Tensor) -> Tensor:
        return layer(hidden)

    def _feature_norm(self, feats: Tensor) -> Tensor:
        return self.post_norm(feats)

    def vision_facts(self) -> dict:
        # the tower attends over a tile's patches and [CLS], before the pixel shuffle groups them
        return {**super().vision_facts(), "tokens_per_view": self.patch_grid[0] * self.patch_grid[1] + 1}

    def _attn_parts(self, layer):
        att = layer.attention
        # q_norm / k_norm (InternViT-6B) act on the whole projection, before the split into heads
        return (layer.layernorm_before, nn.Sequential(att.q_proj, att.q_norm), nn.Sequential(att.k_proj, att.k_norm),
                att.num_heads, att.scale)

    def encode_views(self, views: Tensor, need: tuple[str, ...]) -> Signals:
        """Per-patch signals of the tower, then grouped by the pixel shuffle (module docstring)."""
        inner_need = tuple(n for n in ("feats", "keys", "attn") if n in need or (n == "feats" and "tokens" in need))
        inner = ClsViTAdapter.encode(self, views, inner_need)
        out = Signals(grid=self.view_grid)
        if inner.feats is not None:
            b, n = inner.feats.shape[0], self.view_tokens
            feats = shuffle_groups(inner.feats, self.patch_grid, self.scale).reshape(b, n, -1)   # [B*V, N, 4C]
            out.feats = feats if "feats" in need else None
            out.tokens = self.project(feats) if "tokens" in need else None
        if inner.keys is not None:
            out.keys = shuffle_groups(inner.keys, self.patch_grid, self.scale).mean(dim=2)      # [B*V, N, hd]
        if inner.attn is not None:
            attn = shuffle_groups(inner.attn.unsqueeze(-1), self.patch_grid, self.scale)         # [B*V, N, 4, 1]
            out.attn = attn.mean(dim=(2, 3))                                                      # [B*V, N]
        return out

    def project(self, feats: Tensor) -> Tensor:
        return self.projector(feats)                                                             # [B, M, D_llm]

    # -- loading --------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, chat_template: str | None = None,
                        tiles: tuple[int, int] = DEFAULT_TILES) -> "InternVLAdapter":
        """A local InternVL directory (config.json with model_type 'internvl', weights, tokenizer files), at a
        fixed grid of `tiles` = (rows, cols) tiles (+ a thumbnail when more than one)."""
        from transformers import InternVLForConditionalGeneration

        path = Path(path)
        rows, cols = check_tiles(str(path), tiles)
        model, tokenizer, eos = load_hf_dir(InternVLForConditionalGeneration, path, cls.family, dtype)
        size = int(model.config.vision_config.image_size[0])
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            d = json.loads(pre.read_text())
            mean, std = tuple(d.get("image_mean", mean)), tuple(d.get("image_std", std))
        config = PreprocessConfig(size=(rows * size, cols * size), mean=mean, std=std, shortest_edge=None,
                                  resample="bicubic")
        return cls(model, tokenizer, config, split_template(chat_template or INTERNVL_TEMPLATE, IMAGE_CONTEXT), eos,
                   name=str(path))


# -- the tiny preset ---------------------------------------------------------------------------------
TINY_TEMPLATE = "<|im_start|>user\n<img><IMG_CONTEXT></img>\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def tiny_internvl_model(seed: int = 0, dtype: torch.dtype = torch.float32):
    """(InternVLForConditionalGeneration, tokenizer) of "tiny-internvl": InternViT 112 px / patch 14 (8 x 8
    patches, pixel shuffle 0.5 -> 16 tokens per tile), 2 layers, width 32, layer scale; a Qwen2 LLM with 2
    layers, hidden 64; the Qwen byte tokenizer + <img>, </img>, <IMG_CONTEXT>; seeded random weights."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from edgeprune.models.qwen2_vl import qwen_byte_tokenizer
    from edgeprune.models.tiny import seeded_model

    tokenizer = qwen_byte_tokenizer(("<img>", "</img>", IMAGE_CONTEXT))
    eos, pad = tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=112,
                  patch_size=14, layer_scale_init_value=0.5)   # visible layer scale (0.1 nearly hides the blocks)
    text = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=2048,
                bos_token_id=pad, eos_token_id=eos, pad_token_id=pad, initializer_range=0.1, tie_word_embeddings=False)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.token_to_id(IMAGE_CONTEXT),
                            downsample_ratio=0.5, vision_feature_layer=-1, tie_word_embeddings=False)
    return seeded_model(InternVLForConditionalGeneration, config, seed, dtype), tokenizer


def tiny_internvl(seed: int = 0, dtype: torch.dtype = torch.float32,
                  tiles: tuple[int, int] = (2, 2)) -> InternVLAdapter:
    """The "tiny-internvl" preset: 2 x 2 tiles of 112 px + thumbnail, N = 5 * 16 = 80. Same seed, same weights."""
    model, tokenizer = tiny_internvl_model(seed, dtype)
    rows, cols = check_tiles("tiny-internvl", tiles)
    pre = PreprocessConfig(size=(rows * 112, cols * 112), mean=IMAGENET_MEAN, std=IMAGENET_STD, shortest_edge=None,
                           resample="bicubic")
    return InternVLAdapter(model, tokenizer, pre, split_template(TINY_TEMPLATE, IMAGE_CONTEXT),
                           (tokenizer.token_to_id("<|im_end|>"),), name="tiny-internvl")
