"""The adapter interface: what pruning, the torch reference and the exporter need from a VLM family.

An adapter is an nn.Module that owns the vision encoder, the projector and the LLM of one model,
and knows its preprocessing, prompt layout and position rule. Pruners never see model code: they
get `Signals` (METHODS.md, Common contract).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import Tensor, nn

from edgeprune.runtime.preprocess import PreprocessConfig, preprocess
from edgeprune.runtime.prompt import ChatTemplate

__all__ = ["Signals", "Adapter", "ALL_SIGNALS", "load_hf_dir"]

ALL_SIGNALS = ("tokens", "feats", "keys", "attn", "pixels")


@dataclass
class Signals:
    """Encoder outputs for one batch of images; `None` for what was not asked for."""

    grid: tuple[int, int]
    tokens: Tensor | None = None   # [B, N, D_llm] after the projector
    feats: Tensor | None = None    # [B, N, C] encoder features used for similarity / projection
    keys: Tensor | None = None     # [B, N, Ck] head-mean keys of the layer that feeds `feats`
    attn: Tensor | None = None     # [B, N] [CLS]-to-patch attention (summed over heads) or mean received
    pixels: Tensor | None = None   # [B, 3, h, w] the preprocessed image
    # not a pruning signal: per-token features that must follow the kept tokens through the pruner's gather
    # or merge (Adapter.deepstack; Qwen3-VL's DeepStack features [B, N, L, C] before their mergers)
    carry: Tensor | None = None

    def as_kwargs(self) -> dict:
        """Keyword arguments for `pruner(**signals.as_kwargs())` (the signals, without `carry`)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "carry"}


class Adapter(nn.Module):
    """Base class of model adapters. Subclasses set the attributes and implement the methods below."""

    family: ClassVar[str] = ""            # manifest "model.family"
    preprocess_config: PreprocessConfig
    chat_template: ChatTemplate
    grid: tuple[int, int]                 # patch grid after the encoder (N = H * W image tokens)
    llm: nn.Module                        # transformers causal LM taking inputs_embeds/position_ids/cache
    tokenizer: object                     # tokenizers.Tokenizer (the runtime loads the same tokenizer.json)
    eos_token_ids: tuple[int, ...]
    default_positions: str = "compact"
    # position rule of the LLM (runtime/positions.py): "1d" (LLaMA-style, ids [B, L]) or "mrope"
    # (Qwen2-VL, ids [3, B, L] from the merged grid); the exporter records it as positions.rope
    rope: ClassVar[str] = "1d"
    # what the model was trained to recognise, for a model aligned on a narrow domain (edgeprune-mini);
    # the exporter records it as model.domain and `edgeprune run`/`generate` print it once on stderr
    domain: ClassVar[str | None] = None
    # DeepStack (Qwen3-VL): the number of LLM layers after which per-image-token features are added to the
    # residual; the vision graph then outputs them (`deepstack`) and the decoder takes them as an input
    deepstack_layers: int = 0

    @property
    def num_image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def preprocess(self, images) -> Tensor:
        """Images (paths, PIL, uint8 arrays) -> pixels [B, 3, h, w], with the runtime's own numpy code."""
        return torch.from_numpy(preprocess(images, self.preprocess_config))

    def check_pixels(self, pixels: Tensor) -> None:
        """pixels must be [B, 3, h, w] at this adapter's input size (what `preprocess` returns)."""
        from edgeprune.errors import ModelError

        h, w = self.preprocess_config.size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, h, w):
            raise ModelError(f"{self.family}: pixels of shape {tuple(pixels.shape)}, expected [B, 3, {h}, {w}] "
                             "(use adapter.preprocess(images))")

    def encode(self, pixels: Tensor, need: tuple[str, ...] = ALL_SIGNALS) -> Signals:
        """Run the vision encoder; compute only the signals in `need` (tokens implies projection)."""
        raise NotImplementedError

    def project(self, feats: Tensor) -> Tensor:
        """Encoder features [B, M, C] -> LLM embeddings [B, M, D_llm]."""
        raise NotImplementedError

    def embed(self, ids: Tensor) -> Tensor:
        """Token ids [B, L] -> input embeddings [B, L, D_llm]."""
        return self.llm.get_input_embeddings()(ids)

    def deepstack(self, signals: Signals, selection, pruner) -> Tensor | None:
        """DeepStack features of the K image tokens [B, K, L, D_llm]: `signals.carry` through exactly the gather
        or merge `pruner` applied (Selection.weights), then projected; None for models without DeepStack."""
        return None

    def with_image_size(self, size: tuple[int, int]) -> "Adapter":
        """The same model (shared weights) at another fixed input size (h, w), for resolution buckets:
        its own grid and N. Only adapters whose token count follows the image size support it."""
        from edgeprune.errors import ModelError

        raise ModelError(f"{self.family}: input size is fixed at {tuple(self.preprocess_config.size)}; "
                         f"this model family does not support resolution buckets")

    def vision_facts(self) -> dict:
        """The vision encoder's shape, recorded in the manifest for the planner's memory estimate:
        {"num_layers", "hidden_size", "tokens_per_view" (tokens one encoder pass attends over),
        "views" (encoder passes per image)}."""
        raise NotImplementedError

    def unpruned(self, signals: Signals) -> tuple[Tensor, Tensor]:
        """All N image tokens as the LLM sees them without pruning: (tokens [B, N, D_llm], positions [B, N])."""
        b, n = signals.tokens.shape[:2]
        return signals.tokens, torch.arange(n).unsqueeze(0).expand(b, n)

    def build_pruner(self, method: str, keep: int, **cfg) -> nn.Module:
        """The pruner the exporter puts in the vision graph (and the reference should run) for K = `keep`:
        `build_for_model(method, keep, self.pruner_options(), **cfg)`. Multi-view adapters (LLaVA-NeXT
        anyres) return a module that splits K across views and runs that same method on each."""
        from edgeprune.pruners import build_for_model

        return build_for_model(method, keep, self.pruner_options(), **cfg)

    def pruner_options(self) -> dict:
        """Model facts a pruner may take as options. The exporter and `generate` pass each entry
        whose name the chosen method accepts (see `available()[name].defaults`), unless the user
        set it: one generic rule, no per-method code. E.g. adbts reads pixel_mean / pixel_std."""
        return {"pixel_mean": tuple(self.preprocess_config.mean), "pixel_std": tuple(self.preprocess_config.std)}

    def tokenizer_json(self) -> str:
        """tokenizer.json content for the bundle (the runtime loads it with tokenizers.Tokenizer)."""
        return self.tokenizer.to_str()


def load_hf_dir(model_class, path, family: str, dtype: torch.dtype, **kw):
    """A local Hugging Face model directory -> (model, tokenizers.Tokenizer, eos ids), with the errors
    a user can act on (shared by the adapters that load real weights from disk)."""
    from transformers import AutoTokenizer

    from edgeprune.errors import ModelError

    try:
        model = model_class.from_pretrained(path, dtype=dtype, local_files_only=True, **kw)
        hf_tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load a {family} model from {path}: {err}") from err
    tokenizer = getattr(hf_tok, "backend_tokenizer", None)
    if tokenizer is None:
        raise ModelError(f"{path}: tokenizer has no fast (tokenizers) backend; add a tokenizer.json")
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = eos if eos is not None else model.config.text_config.eos_token_id
    eos = (eos,) if isinstance(eos, int) else tuple(eos or ())
    if not eos:
        raise ModelError(f"{path}: no eos_token_id in generation_config.json or config.json")
    return model, tokenizer, eos
