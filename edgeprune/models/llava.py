"""LLaVA family: transformers `LlavaForConditionalGeneration` (CLIP vision tower with [CLS], MLP
projector, Llama/Vicuna LLM), loaded from a local directory or built by a tiny preset.

Signals (METHODS.md): `feats` = patch tokens of hidden state `vision_feature_layer` (-2 for
LLaVA-1.5: the output of the second-to-last encoder layer, [CLS] dropped, as LLaVA's "default"
select strategy); `tokens` = projector(feats); `keys` / `attn` of the layer producing `feats`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from edgeprune.errors import ModelError
from edgeprune.models._vit import ClsViTAdapter
from edgeprune.models.base import load_hf_dir
from edgeprune.runtime.preprocess import PreprocessConfig
from edgeprune.runtime.prompt import ChatTemplate

__all__ = ["LlavaAdapter", "split_template", "causal_lm_from_parts", "LLAVA15_TEMPLATE"]

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
# LLaVA-1.5 conversation format; BOS is written out because prefix/suffix are tokenised without
# added special tokens (runtime/prompt.py), and "<s>" in the text is matched as the special token.
LLAVA15_TEMPLATE = "<s>USER: <image>\n{prompt} ASSISTANT:"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL codes in preprocessor_config.json


def split_template(template: str, image: str = IMAGE_PLACEHOLDER) -> ChatTemplate:
    """"...<image>...{prompt}..." -> ChatTemplate(prefix before the image, suffix after it).

    The image must appear exactly once and before {prompt} (the runtime lays out
    [prefix, image tokens, suffix-with-prompt])."""
    if template.count(image) != 1:
        raise ModelError(f"chat template {template!r} has {template.count(image)} {image} placeholders; "
                         "expected exactly one (there must be room for the image)")
    prefix, suffix = template.split(image)
    if "{prompt}" not in suffix:
        raise ModelError(f"chat template {template!r}: expected {{prompt}} after {image}")
    return ChatTemplate(prefix=prefix, suffix=suffix)


def causal_lm_from_parts(text_config, language_model: nn.Module, lm_head: nn.Module) -> nn.Module:
    """A transformers causal LM (e.g. LlamaForCausalLM) sharing the given decoder and head, so the
    LLM is used like any causal LM (inputs_embeds, position_ids, cache -> logits).
    Built on the meta device first: no second copy of the weights is allocated."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(text_config)
    llm.model = language_model
    llm.lm_head = lm_head
    leftover = [n for n, t in [*llm.named_parameters(), *llm.named_buffers()] if t.is_meta]
    assert not leftover, f"causal LM shell kept meta tensors: {leftover}"
    return llm.eval()


def preprocess_config_from_dir(path: Path, image_size: int) -> PreprocessConfig:
    """CLIPImageProcessor settings from preprocessor_config.json, else LLaVA-1.5's defaults."""
    default = PreprocessConfig(size=(image_size, image_size), mean=CLIP_MEAN, std=CLIP_STD,
                               shortest_edge=image_size, resample="bicubic")
    file = path / "preprocessor_config.json"
    if not file.is_file():
        return default
    cfg = json.loads(file.read_text())
    crop = cfg.get("crop_size") or {}
    crop = (crop, crop) if isinstance(crop, int) else (crop.get("height", image_size), crop.get("width", image_size))
    size = cfg.get("size") or {}
    shortest = size if isinstance(size, int) else size.get("shortest_edge")
    if not cfg.get("do_center_crop", True):
        crop, shortest = (size.get("height", image_size), size.get("width", image_size)), None
    if tuple(crop) != (image_size, image_size):
        raise ModelError(f"{file}: crop {tuple(crop)} does not match the vision tower's image_size {image_size}")
    return PreprocessConfig(size=tuple(crop), mean=tuple(cfg.get("image_mean", CLIP_MEAN)),
                            std=tuple(cfg.get("image_std", CLIP_STD)), shortest_edge=shortest,
                            resample=_RESAMPLE.get(cfg.get("resample", 3), "bicubic"))


class LlavaAdapter(ClsViTAdapter):
    """Adapter over a `LlavaForConditionalGeneration` (parts are taken, the wrapper is not kept)."""

    family = "llava"
    default_positions = "compact"  # LLaVA DivPrune / VisionZip convention

    def __init__(self, model, tokenizer, preprocess_config: PreprocessConfig, chat_template: ChatTemplate,
                 eos_token_ids: tuple[int, ...], name: str = "llava"):
        super().__init__()
        cfg = model.config
        layer = cfg.vision_feature_layer
        if not isinstance(layer, int):
            raise ModelError(f"{name}: vision_feature_layer={layer!r} (multi-layer features) is not supported")
        if cfg.vision_feature_select_strategy != "default":
            raise ModelError(f"{name}: vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}; "
                             "only 'default' (drop [CLS]) is supported")
        vcfg = cfg.vision_config
        num_layers = vcfg.num_hidden_layers
        hidden_index = layer if layer >= 0 else num_layers + 1 + layer  # index into hidden_states (0 = embeddings)
        if not 1 <= hidden_index <= num_layers:
            raise ModelError(f"{name}: vision_feature_layer={layer} outside the {num_layers}-layer encoder")
        self.name = name
        self.config = cfg
        self.vision = model.model.vision_tower               # CLIPVisionModel (no .vision_model in transformers 5)
        self.projector = model.model.multi_modal_projector
        self.llm = causal_lm_from_parts(cfg.text_config, model.model.language_model, model.lm_head)
        self.feature_layer = hidden_index - 1
        self.grid = (vcfg.image_size // vcfg.patch_size,) * 2
        self.tokenizer = tokenizer
        self.preprocess_config = preprocess_config
        self.chat_template = chat_template
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        self.eval()

    # -- ClsViTAdapter hooks ------------------------------------------------------------------------
    def _embed(self, pixels: Tensor) -> Tensor:
        x = self.vision.embeddings(pixels.to(self.vision.embeddings.patch_embedding.weight.dtype))
        return self.vision.pre_layrnorm(x)                               # [B, 1+N, C]

    def _layers(self) -> nn.ModuleList:
        return self.vision.encoder.layers

    def _attn_parts(self, layer):
        att = layer.self_attn
        return layer.layer_norm1, att.q_proj, att.k_proj, att.num_heads, att.scale

    def project(self, feats: Tensor) -> Tensor:
        return self.projector(feats)                                     # [B, M, D_llm]

    # -- loading ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        chat_template: str | None = None) -> "LlavaAdapter":
        """A local LLaVA directory (config.json with model_type 'llava', weights, tokenizer files)."""
        from transformers import LlavaForConditionalGeneration

        path = Path(path)
        model, tokenizer, eos = load_hf_dir(LlavaForConditionalGeneration, path, "LLaVA", dtype)
        vcfg = model.config.vision_config
        return cls(model, tokenizer, preprocess_config_from_dir(path, vcfg.image_size),
                   split_template(chat_template or LLAVA15_TEMPLATE), eos, name=str(path))
