"""Qwen2-VL family: transformers `Qwen2VLForConditionalGeneration` (ViT with 2-D rotary attention, no
[CLS], a 2x2 PatchMerger as the projector, a Qwen2 LLM with M-RoPE), loaded from a local directory
or built by the "tiny-qwen2-vl" preset.

Fixed resolution: images are resized to one `image_size` (h, w), multiples of patch * merge (28), so
N = (h/28) * (w/28) is static. Pruning happens after the PatchMerger, on the merged grid (h/28, w/28):
merged token i = r * W + c sits at row r, column c (the merger's own output order).

Signals (METHODS.md, Common contract), all on the merged grid of N tokens:
- `feats` [B, N, 4C]: the last vision block's output, the 4 patches of each merge group concatenated
  (the merger's input); `project(feats)` = the merger (ln_q per patch, then its MLP), so merged
  (averaged) feats still project like the merger does.
- `tokens` [B, N, D_llm] = project(feats), what Qwen2-VL feeds the LLM.
- `keys` [B, N, hd]: the documented substitute for a [CLS]-style encoder's keys: head-mean keys of the
  last block, taken BEFORE the 2-D rotary (so similarity compares content, not position), averaged
  over the 4 patches of each merge group.
- `attn` [B, N]: no [CLS]: the mean attention each patch receives in the last block (softmax rows
  averaged over heads and queries), averaged over the 4 patches of its merge group.
The encoder is walked block by block here (its own modules, batched sdpa per image instead of the
packed cu_seqlens form), so it traces to ONNX with a dynamic batch; `attn` is recomputed from the
last block's q/k only, the encoder keeps sdpa.

Positions: M-RoPE (`rope = "mrope"`), built by runtime.positions.mrope_positions.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeprune.errors import ModelError
from edgeprune.models._vit import check_need
from edgeprune.models.base import ALL_SIGNALS, Adapter, Signals, load_hf_dir
from edgeprune.models.llava import CLIP_MEAN, CLIP_STD, split_template
from edgeprune.pruners.ops import NEG_INF
from edgeprune.runtime.preprocess import PreprocessConfig
from edgeprune.runtime.prompt import ChatTemplate

__all__ = ["Qwen2VLAdapter", "Qwen2VLTextLM", "QWEN2_VL_TEMPLATE", "IMAGE_PAD", "tiny_qwen2_vl",
           "tiny_qwen2_vl_model", "qwen_byte_tokenizer", "QWEN_SPECIALS"]


IMAGE_PAD = "<|image_pad|>"
QWEN2_VL_TEMPLATE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                     "<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n")
DEFAULT_IMAGE_SIZE = (448, 448)   # 16 x 16 = 256 merged tokens


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Qwen2VLTextLM(nn.Module):
    """The Qwen2-VL text model + lm_head as a plain causal LM (inputs_embeds, position_ids [3, B, L] or
    [B, L], attention_mask, cache -> logits), sharing the parts of the full model. Has the
    `.model.{layers, norm, rotary_emb}` layout export/llm.py's DecoderGraph walks."""

    def __init__(self, text_config, language_model: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.config = text_config
        self.model = language_model
        self.lm_head = lm_head

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, inputs_embeds: Tensor, position_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                cache=None, use_cache: bool | None = None, logits_to_keep: int = 0):
        return self._run(inputs_embeds, position_ids, attention_mask, cache, use_cache, logits_to_keep, {})

    def _run(self, inputs_embeds, position_ids, attention_mask, cache, use_cache, logits_to_keep: int, extra: dict):
        """The text model (with `extra` model inputs, e.g. Qwen3-VL's DeepStack) and the head on the last positions."""
        from transformers.modeling_outputs import CausalLMOutputWithPast

        # `cache`: transformers 5.24's name for the KV cache (`past_key_values` is deprecated, gone in 5.40)
        out = self.model(inputs_embeds=inputs_embeds, position_ids=position_ids, attention_mask=attention_mask,
                         cache=cache, use_cache=use_cache, **extra)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=self.lm_head(hidden), cache=out.cache)


class Qwen2VLAdapter(Adapter):
    """Adapter over a `Qwen2VLForConditionalGeneration` at a fixed input resolution."""

    family = "qwen2_vl"
    rope = "mrope"
    default_positions = "original"   # M-RoPE keeps grid ids (runtime.positions); "compact" is refused
    text_lm = Qwen2VLTextLM          # the LLM wrapper class (Qwen3-VL's takes DeepStack inputs)
    deepstack_index: tuple[int, ...] = ()   # vision blocks whose outputs become Signals.carry (Qwen3-VL)

    def __init__(self, model, tokenizer, preprocess_config: PreprocessConfig, chat_template: ChatTemplate,
                 eos_token_ids: tuple[int, ...], name: str = "qwen2_vl"):
        super().__init__()
        cfg = model.config
        vcfg = cfg.vision_config
        self.patch, self.merge = int(vcfg.patch_size), int(vcfg.spatial_merge_size)
        h, w = preprocess_config.size
        unit = self.patch * self.merge
        if h % unit or w % unit:
            raise ModelError(f"{name}: image size {(h, w)} is not a multiple of patch * merge = {unit} on both sides")
        self.name = name
        self.config = cfg
        self.visual = model.model.visual
        self.llm = self.text_lm(cfg.text_config, model.model.language_model, model.lm_head).eval()
        self.patch_grid = (h // self.patch, w // self.patch)
        self.grid = (h // unit, w // unit)
        self.tokenizer = tokenizer
        self.preprocess_config = preprocess_config
        self.chat_template = chat_template
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        self._rotary: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        self.rotary_for(self.patch_grid)   # computed eagerly: constants in the traced graph
        self.eval()

    def with_image_size(self, size: tuple[int, int]) -> "Qwen2VLAdapter":
        """This adapter (same modules, no copy of the weights) at input size `size` (h, w), multiples of 28:
        its own grid and N (resolution buckets, export/bundle.py)."""
        h, w = int(size[0]), int(size[1])
        unit = self.patch * self.merge
        if h < unit or w < unit or h % unit or w % unit:
            raise ModelError(f"{self.name}: image size {(h, w)} is not a positive multiple of patch * merge = {unit}")
        other = copy.copy(self)   # shallow: the module dicts (weights) are shared
        other.preprocess_config = dataclasses.replace(self.preprocess_config, size=(h, w))
        other.patch_grid = (h // self.patch, w // self.patch)
        other.grid = (h // unit, w // unit)
        other.rotary_for(other.patch_grid)
        return other

    # -- vision --------------------------------------------------------------------------------------
    @torch.no_grad()
    def rotary_for(self, patch_grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """cos, sin [Np, hd] of the vision rotary for a patch grid, in the merge-block patch order."""
        if patch_grid not in self._rotary:
            from transformers.vision_utils import get_vision_position_ids

            thw = torch.tensor([[1, *patch_grid]])
            ids = get_vision_position_ids(thw, self.merge)                       # [Np, 2] (h, w)
            cos, sin = self.visual.rotary_pos_emb(torch.zeros(1), ids)           # [Np, hd] each
            self._rotary[patch_grid] = (cos.float(), sin.float())
        return self._rotary[patch_grid]

    def _patch_embed(self, pixels: Tensor) -> Tensor:
        """pixels [B, 3, H, W] -> patch embeddings [B, Np, C] in the merge-block order of Qwen2-VL
        ((row block, column block, row in block, column in block)), so 4 consecutive patches merge."""
        proj = self.visual.patch_embed.proj
        weight = proj.weight                                                    # [C, 3, T, P, P]
        # The processor repeats a still image over the T=2 temporal frames: the Conv3d over two equal
        # frames is a Conv2d with the temporal taps summed (and its bias, Qwen3-VL's, once).
        x = F.conv2d(pixels.to(weight.dtype), weight.sum(dim=2), proj.bias, stride=self.patch)  # [B, C, gh, gw]
        b, c, gh, gw = x.shape
        m = self.merge
        x = x.reshape(b, c, gh // m, m, gw // m, m).permute(0, 2, 4, 3, 5, 1)  # [B, gh/m, gw/m, m, m, C]
        return x.reshape(b, gh * gw, c)                                         # [B, Np, C]

    def _block_mask(self, index: int, patch_grid: tuple[int, int]) -> Tensor | None:
        """Boolean attention mask [Np, Np] (True = may attend) of vision block `index`, or None for full
        attention within the image (every Qwen2-VL block; Qwen2.5-VL's windowed blocks override)."""
        return None

    def _block(self, block: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None):
        """One vision block on [B, Np, C] (full attention within each image, as cu_seqlens does, or the
        boolean `mask` [Np, Np]). Returns (output, rotated q, rotated k, raw k), q/k as [B, H, Np, hd]."""
        att = block.attn
        b, n, _ = x.shape
        qkv = att.qkv(block.norm1(x)).reshape(b, n, 3, att.num_heads, -1)    # [B, Np, 3, H, hd]
        q, k_raw, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]                 # [B, Np, H, hd]
        c, s = cos[:, None, :], sin[:, None, :]                                 # [Np, 1, hd] float32
        # rotary in float32 and back, as transformers' apply_rotary_pos_emb_vision does (fp16 models)
        q = (q.float() * c + _rotate_half(q.float()) * s).to(v.dtype)
        k = (k_raw.float() * c + _rotate_half(k_raw.float()) * s).to(v.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)      # [B, H, Np, hd]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=att.scaling)  # [B, H, Np, hd]
        x = x + att.proj(out.transpose(1, 2).reshape(b, n, -1))
        x = x + block.mlp(block.norm2(x))
        return x, q, k, k_raw

    def encode(self, pixels: Tensor, need: tuple[str, ...] = ALL_SIGNALS) -> Signals:
        need = check_need(need)
        self.check_pixels(pixels)
        gh, gw = pixels.shape[2] // self.patch, pixels.shape[3] // self.patch
        grid = (gh // self.merge, gw // self.merge)
        cos, sin = self.rotary_for((gh, gw))
        x = self._patch_embed(pixels)                                          # [B, Np, C]
        taps = []
        for i, block in enumerate(self.visual.blocks):
            mask = self._block_mask(i, (gh, gw))
            x, q, k, k_raw = self._block(block, x, cos, sin, mask)             # q/k of the last block survive
            if i in self.deepstack_index:
                taps.append(x)
        b, n_patches, c = x.shape
        n, group = n_patches // self.merge ** 2, self.merge ** 2
        out = Signals(grid=grid, pixels=pixels if "pixels" in need else None)
        if taps:   # DeepStack: the tapped blocks' outputs, merge groups concatenated like `feats`
            out.carry = torch.stack([t.reshape(b, n, group * c) for t in taps], dim=2)   # [B, N, L, 4C]
        if "feats" in need or "tokens" in need:
            feats = x.reshape(b, n, group * c)                                 # [B, N, 4C] merger input
            out.feats = feats if "feats" in need else None
            out.tokens = self.project(feats) if "tokens" in need else None    # [B, N, D_llm]
        if "keys" in need:
            keys = k_raw.mean(dim=2)                                           # [B, Np, hd] head mean, pre-rotary
            out.keys = keys.reshape(b, n, group, -1).mean(dim=2)               # [B, N, hd]
        if "attn" in need:
            scale = self.visual.blocks[-1].attn.scaling
            scores = torch.matmul(q, k.transpose(-1, -2)) * scale             # [B, H, Np, Np]
            if mask is not None:   # a windowed last block: attention as that block computes it
                scores = scores.masked_fill(~mask, NEG_INF)
            probs = scores.softmax(dim=-1)
            received = probs.mean(dim=(1, 2))                                  # [B, Np] mean over heads, queries
            out.attn = received.reshape(b, n, group).mean(dim=2)               # [B, N]
        return out

    def vision_facts(self) -> dict:
        blocks = self.visual.blocks
        return {"num_layers": len(blocks), "hidden_size": int(blocks[0].norm1.weight.shape[0]),
                "tokens_per_view": self.patch_grid[0] * self.patch_grid[1], "views": 1}  # patches before the merge

    def project(self, feats: Tensor) -> Tensor:
        """[B, M, 4C] (4 patches concatenated) -> [B, M, D_llm]: the PatchMerger (ln_q per patch, MLP)."""
        merger = self.visual.merger
        b, m, _ = feats.shape
        c = merger.ln_q.weight.shape[0]   # LayerNorm (Qwen2-VL) or RMSNorm (Qwen2.5-VL): per-patch width
        x = merger.ln_q(feats.reshape(b, m, -1, c)).reshape(b, m, -1)
        return merger.mlp(x)

    # -- loading --------------------------------------------------------------------------------------
    @staticmethod
    def hf_class():
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, chat_template: str | None = None,
                        image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE) -> "Qwen2VLAdapter":
        """A local Qwen2-VL directory (config.json with model_type 'qwen2_vl', weights, tokenizer files),
        run at the fixed `image_size` (h, w), multiples of 28."""
        path = Path(path)
        model, tokenizer, eos = load_hf_dir(cls.hf_class(), path, cls.family, dtype, attn_implementation="sdpa")
        mean, std = CLIP_MEAN, CLIP_STD
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            d = json.loads(pre.read_text())
            mean, std = tuple(d.get("image_mean", mean)), tuple(d.get("image_std", std))
        config = PreprocessConfig(size=tuple(image_size), mean=mean, std=std, shortest_edge=None, resample="bicubic")
        return cls(model, tokenizer, config, split_template(chat_template or QWEN2_VL_TEMPLATE, IMAGE_PAD), eos,
                   name=str(path))


# -- the tiny preset ---------------------------------------------------------------------------------
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", IMAGE_PAD)
TINY_TEMPLATE = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n"
TINY_IMAGE_SIZE = (168, 224)   # patch grid 12 x 16 -> merged grid 6 x 8, N = 48 (not square: h/w mix-ups show)


def qwen_byte_tokenizer(extra: tuple[str, ...] = ()):
    """Byte-level tokenizer (one token per byte, id = byte value) + QWEN_SPECIALS (ids 256...) + `extra`."""
    from edgeprune.models.tiny import byte_tokenizer

    return byte_tokenizer((*QWEN_SPECIALS, *extra))


def tiny_qwen2_vl_model(seed: int = 0, dtype: torch.dtype = torch.float32, llm_layers: int = 2):
    """(Qwen2VLForConditionalGeneration, tokenizers.Tokenizer) of the "tiny-qwen2-vl" preset: vision
    2 blocks, width 32, 4 heads, patch 14, merge 2; LLM 2 layers, hidden 64, 4 heads / 2 KV heads,
    mrope_section [2, 3, 3] (head_dim 16); seeded random weights."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    return tiny_model(Qwen2VLConfig, Qwen2VLForConditionalGeneration, vision, seed, dtype,
                      text={"num_hidden_layers": llm_layers})


def tiny_model(config_cls, model_cls, vision: dict, seed: int, dtype: torch.dtype, text: dict | None = None):
    """A Qwen-VL-family model of `model_cls` with the tiny text config (updated by `text`) and tokenizer shared
    by the presets."""
    tokenizer = qwen_byte_tokenizer()
    ids = {t: tokenizer.token_to_id(t) for t in QWEN_SPECIALS}
    vocab = tokenizer.get_vocab_size()
    text = {**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                initializer_range=0.1),  # wider logits: fewer near-ties between torch and ORT
            **(text or {})}
    config = config_cls(vision_config=vision, text_config=text, image_token_id=ids[IMAGE_PAD],
                           video_token_id=ids[IMAGE_PAD], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).to(dtype)
    with torch.no_grad():
        model.lm_head.weight[ids["<|im_end|>"]].zero_()   # EOS must not win by construction (see tiny.py)
    return model.eval(), tokenizer


def tiny_qwen2_vl(seed: int = 0, dtype: torch.dtype = torch.float32,
                  image_size: tuple[int, int] = TINY_IMAGE_SIZE, llm_layers: int = 2) -> Qwen2VLAdapter:
    """The "tiny-qwen2-vl" preset at a fixed `image_size` (multiples of 28). Same seed, same weights;
    `llm_layers` for multi-stage in-LLM tests."""
    model, tokenizer = tiny_qwen2_vl_model(seed, dtype, llm_layers)
    return tiny_adapter(Qwen2VLAdapter, model, tokenizer, image_size, "tiny-qwen2-vl")


def tiny_adapter(cls, model, tokenizer, image_size: tuple[int, int], name: str) -> "Qwen2VLAdapter":
    pre = PreprocessConfig(size=tuple(image_size), mean=CLIP_MEAN, std=CLIP_STD, shortest_edge=None,
                           resample="bicubic")
    eos = tokenizer.token_to_id("<|im_end|>")
    return cls(model, tokenizer, pre, split_template(TINY_TEMPLATE, IMAGE_PAD), (eos,), name=name)
