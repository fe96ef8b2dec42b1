"""SmolVLM / SmolVLM2 (Idefics3 family): transformers `SmolVLMForConditionalGeneration` (model_type "smolvlm")
and `Idefics3ForConditionalGeneration` ("idefics3", SmolVLM-256M/500M-Instruct's published class): a SigLIP
tower without [CLS], a pixel shuffle by `scale_factor` and a linear connector, a Llama (SmolLM2) LLM.
Loaded from a local directory or built by the "tiny-smolvlm" preset.

Static image splitting (models/_tiles.py): the image is resized to rows*S x cols*S (S = 512 px for the
256M/500M models), split into S x S tiles row-major, and the global image (the whole image at S x S)
comes last; one tile means no split and the global image alone, as the processor does for small images.
Each view gives (S/patch/scale)^2 tokens (64 at 512 px, patch 16, scale 4). The image block of the
prompt is the processor's own string (transformers' `get_image_prompt_string`), tokenised once:

    <fake_token_around_image><row_1_col_1><image>*64 <fake_token_around_image><row_1_col_2><image>*64 \\n
    ... \\n <fake_token_around_image><global-img><image>*64<fake_token_around_image>

Its text tokens (tile markers, newlines, the global-image marker) are fixed tokens: the vision graph outputs
their embeddings at their packed positions, they are never pruned, and they count in K; the budget of the
image tokens is split across the views as for LLaVA-NeXT. N = the whole block's length.

Signals, per view, on the merged grid of the pixel shuffle (merged token i = r * W + c is the s x s
patches (s*r + dr, s*c + dc)), as for Qwen2-VL (SigLIP has no [CLS]):
- `feats` [B, N, s*s*C]: the tower's output (after its post-layernorm) pixel-shuffled, the connector's
  input; `project` = the connector's linear map, so merged (averaged) feats project as the model does.
- `tokens` = project(feats).
- `keys` [B, N, hd]: head-mean keys of the last layer, averaged over the s x s patches.
- `attn` [B, N]: the mean attention each patch receives in the last layer (softmax rows averaged over
  heads and queries), averaged over the s x s patches.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from edgeprune.errors import ModelError
from edgeprune.models._tiles import TiledMixin, check_tiles, tile_grid
from edgeprune.models._vit import shuffle_groups
from edgeprune.models.base import Adapter, Signals, load_hf_dir
from edgeprune.models.llava import causal_lm_from_parts, split_template
from edgeprune.runtime.preprocess import PreprocessConfig
from edgeprune.runtime.prompt import ChatTemplate

__all__ = ["SmolVLMAdapter", "tiny_smolvlm", "tiny_smolvlm_model", "SMOLVLM_TEMPLATE", "image_block"]

IMAGE, FAKE, GLOBAL = "<image>", "<fake_token_around_image>", "<global-img>"
SMOLVLM_TEMPLATE = "<|im_start|>User:<image>{prompt}<end_of_utterance>\nAssistant:"
DEFAULT_TILES = (2, 2)   # + global image: 5 views, 320 image tokens at 512 px
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}   # PIL codes in preprocessor_config.json


def image_block(rows: int, cols: int, view_tokens: int) -> str:
    """The processor's text for one image split into rows x cols tiles (1 x 1: not split)."""
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    split = rows * cols > 1
    return get_image_prompt_string(rows if split else 0, cols if split else 0, view_tokens, FAKE, IMAGE, GLOBAL)


def _patch_position_ids(side: int) -> Tensor:
    """The position ids SmolVLMVisionEmbeddings computes for an unpadded tile of side x side patches (its
    bucketize over fractional coordinates, same float32 arithmetic), computed once: constants in the graph."""
    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    step = 1.0 / torch.tensor(side)
    coords = torch.clamp(torch.arange(side, dtype=torch.float32) * step, max=1.0 - 1e-6)
    bucket = torch.bucketize(coords, boundaries, right=True)
    return (bucket[:, None] * side + bucket[None, :]).reshape(-1)                # [side * side]


class SmolVLMAdapter(TiledMixin, Adapter):
    """Adapter over a `SmolVLMForConditionalGeneration` / `Idefics3ForConditionalGeneration` at one tile grid."""

    family = "smolvlm"
    default_positions = "compact"
    fixed_name = "marker"

    def __init__(self, model, tokenizer, preprocess_config: PreprocessConfig, chat_template: ChatTemplate,
                 eos_token_ids: tuple[int, ...], name: str = "smolvlm"):
        super().__init__()
        cfg = model.config
        vcfg = cfg.vision_config
        size, patch, scale = int(vcfg.image_size), int(vcfg.patch_size), int(cfg.scale_factor)
        side = size // patch
        if side * patch != size or side % scale:
            raise ModelError(f"{name}: image_size {size} / patch {patch} / scale_factor {scale} do not tile evenly")
        rows, cols = tile_grid(name, preprocess_config.size, size)
        self.name = name
        self.config = cfg
        self.vision = model.model.vision_model
        self.connector = model.model.connector
        self.llm = causal_lm_from_parts(cfg.text_config, model.model.text_model, model.lm_head)
        self.scale, self.patch_grid = scale, (side, side)
        self.view_size, self.view_grid = size, (side // scale, side // scale)
        self.grid = self.view_grid
        self.register_buffer("patch_ids", _patch_position_ids(side), persistent=False)
        self.tokenizer = tokenizer
        self._set_tiles(rows, cols)
        self.check_tiling(name)
        self.preprocess_config = preprocess_config
        self.chat_template = chat_template
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        self.eval()

    def _set_tiles(self, rows: int, cols: int) -> None:
        """Packed positions of every view's tokens and of the fixed text tokens, from the tokenised block."""
        self.rows, self.cols = rows, cols
        self.overview = "last" if rows * cols > 1 else None                  # the global image, after the tiles
        image_id = self.tokenizer.token_to_id(IMAGE)
        if image_id is None:
            raise ModelError(f"{self.name}: the tokenizer has no {IMAGE} token")
        ids = self.tokenizer.encode(image_block(rows, cols, self.view_tokens), add_special_tokens=False).ids
        image_at = [i for i, t in enumerate(ids) if t == image_id]
        n = self.view_tokens
        if len(image_at) != self.num_views * n:
            raise ModelError(f"{self.name}: the image block tokenises to {len(image_at)} {IMAGE} tokens, expected "
                             f"{self.num_views} views x {n} (does the tokenizer have <row_{rows}_col_{cols}>?)")
        self.packed = [image_at[v * n:(v + 1) * n] for v in range(self.num_views)]
        self.fixed_positions = [i for i, t in enumerate(ids) if t != image_id]
        self.fixed_ids = [ids[i] for i in self.fixed_positions]

    def fixed_tokens(self) -> Tensor:
        with torch.no_grad():
            return self.embed(torch.tensor([self.fixed_ids])).squeeze(0)             # [R, D_llm]

    # -- vision (one view) ----------------------------------------------------------------------------
    def vision_facts(self) -> dict:
        layers = self.vision.encoder.layers
        return {"num_layers": len(layers), "hidden_size": int(layers[0].layer_norm1.weight.shape[0]),
                "tokens_per_view": self.patch_grid[0] * self.patch_grid[1], "views": int(self.num_views)}  # no [CLS]

    def encode_views(self, views: Tensor, need: tuple[str, ...]) -> Signals:
        self.check_pixels(views)
        emb = self.vision.embeddings
        x = emb.patch_embedding(views.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)  # [B, Np, C]
        x = x + emb.position_embedding(self.patch_ids)
        layers = self.vision.encoder.layers
        for layer in layers[:-1]:
            x = layer(x, None)                                                  # every patch valid: no mask
        out = Signals(grid=self.view_grid)
        if "feats" in need or "tokens" in need:
            hidden = self.vision.post_layernorm(layers[-1](x, None))            # [B, Np, C] last_hidden_state
            feats = shuffle_groups(hidden, self.patch_grid, self.scale).flatten(2)   # [B, N, s*s*C]
            out.feats = feats if "feats" in need else None
            out.tokens = self.project(feats) if "tokens" in need else None
        if "keys" in need or "attn" in need:
            out.keys, out.attn = self._keys_attn(layers[-1], x, need)
        return out

    def _keys_attn(self, layer: nn.Module, x: Tensor, need: tuple[str, ...]):
        """Head-mean keys and mean received attention of `layer` from its input x [B, Np, C], grouped."""
        att = layer.self_attn
        b, n, _ = x.shape
        h = layer.layer_norm1(x)
        k = att.k_proj(h).reshape(b, n, att.num_heads, -1)                     # [B, Np, H, hd]
        keys = attn = None
        if "keys" in need:
            keys = shuffle_groups(k.mean(dim=2), self.patch_grid, self.scale).mean(dim=2)   # [B, N, hd]
        if "attn" in need:
            q = att.q_proj(h).reshape(b, n, att.num_heads, -1)
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * att.scale         # [B, H, Np, Np]
            received = scores.softmax(dim=-1).mean(dim=(1, 2))                  # [B, Np] mean over heads, queries
            attn = shuffle_groups(received.unsqueeze(-1), self.patch_grid, self.scale).mean(dim=(2, 3))  # [B, N]
        return keys, attn

    def project(self, feats: Tensor) -> Tensor:
        return self.connector.modality_projection(feats)                          # [B, M, D_llm]

    # -- loading --------------------------------------------------------------------------------------
    @staticmethod
    def hf_class(model_type: str):
        if model_type == "idefics3":
            from transformers import Idefics3ForConditionalGeneration

            return Idefics3ForConditionalGeneration
        from transformers import SmolVLMForConditionalGeneration

        return SmolVLMForConditionalGeneration

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, chat_template: str | None = None,
                        tiles: tuple[int, int] = DEFAULT_TILES) -> "SmolVLMAdapter":
        """A local SmolVLM / SmolVLM2 / Idefics3 directory at a fixed grid of `tiles` = (rows, cols) tiles
        (+ the global image when more than one)."""
        path = Path(path)
        rows, cols = check_tiles(str(path), tiles)
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        model, tokenizer, eos = load_hf_dir(cls.hf_class(model_type), path, cls.family, dtype)
        size = int(model.config.vision_config.image_size)
        mean, std, resample = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "lanczos"
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            d = json.loads(pre.read_text())
            mean, std = tuple(d.get("image_mean", mean)), tuple(d.get("image_std", std))
            resample = _RESAMPLE.get(d.get("resample", 1), "lanczos")
        config = PreprocessConfig(size=(rows * size, cols * size), mean=mean, std=std, shortest_edge=None,
                                  resample=resample)
        return cls(model, tokenizer, config, split_template(chat_template or SMOLVLM_TEMPLATE, IMAGE), eos,
                   name=str(path))


# -- the tiny preset ---------------------------------------------------------------------------------
SMOL_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<end_of_utterance>", FAKE, GLOBAL, IMAGE,
                 *(f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)))


def tiny_smolvlm_model(seed: int = 0, dtype: torch.dtype = torch.float32, model_type: str = "smolvlm"):
    """(model, tokenizer) of "tiny-smolvlm": SigLIP-style tower 64 px / patch 8 (8 x 8 patches, scale 2 -> 16
    tokens per tile), 2 layers, width 32; a Llama LLM with 2 layers, hidden 64; a byte tokenizer with
    SmolVLM's special tokens (row/column markers up to 4 x 4); seeded random weights. `model_type`
    "idefics3" builds the same shapes as an Idefics3ForConditionalGeneration."""
    from transformers import Idefics3Config, SmolVLMConfig

    from edgeprune.models.tiny import byte_tokenizer, seeded_model

    tokenizer = byte_tokenizer(SMOL_SPECIALS)
    eos, pad = tokenizer.token_to_id("<end_of_utterance>"), tokenizer.token_to_id("<|endoftext|>")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                  patch_size=8)
    text = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=2048,
                bos_token_id=pad, eos_token_id=eos, pad_token_id=pad, initializer_range=0.1, tie_word_embeddings=False)
    config_cls = Idefics3Config if model_type == "idefics3" else SmolVLMConfig
    config = config_cls(vision_config=vision, text_config=text, image_token_id=tokenizer.token_to_id(IMAGE),
                        scale_factor=2, tie_word_embeddings=False)
    return seeded_model(SmolVLMAdapter.hf_class(model_type), config, seed, dtype), tokenizer


def tiny_smolvlm(seed: int = 0, dtype: torch.dtype = torch.float32, tiles: tuple[int, int] = (2, 2)) -> SmolVLMAdapter:
    """The "tiny-smolvlm" preset: 2 x 2 tiles of 64 px + the global image (80 image tokens) and 14 marker
    tokens, N = 94. Same seed, same weights."""
    model, tokenizer = tiny_smolvlm_model(seed, dtype)
    rows, cols = check_tiles("tiny-smolvlm", tiles)
    pre = PreprocessConfig(size=(rows * 64, cols * 64), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), shortest_edge=None,
                           resample="lanczos")
    return SmolVLMAdapter(model, tokenizer, pre, split_template(SMOLVLM_TEMPLATE, IMAGE),
                          (tokenizer.token_to_id("<end_of_utterance>"),), name="tiny-smolvlm")
