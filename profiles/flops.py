"""Predicted prefill cost from the LLM's shapes (multiply-accumulates), for the speedup an in-LLM stage can give.

Per layer on n tokens: n * (D*H*dh + 2*D*Hkv*dh + H*dh*D + 3*D*I) for the q/k/v/o projections and the gated
MLP, plus 2 * n^2 * H * dh for QK^T and AV computed densely (ONNX Runtime's attention kernels multiply the
whole n x n block and mask it; a causal-aware kernel would do about half). Norms, rotary and the stage's own
scoring are left out; the LM head runs on the last token only, the same for every configuration.
This is the FastV / DART Eq. 12 count (4nd^2 + 2n^2d + 2ndm) with GQA and a three-matrix MLP. Torch-free.
"""
from __future__ import annotations

from edgeprune.runtime.format import Keys

__all__ = ["layer_macs", "prefill_macs", "prefill_ratio", "shapes_known", "LLM_SHAPES"]

LLM_SHAPES = (Keys.LLM_HIDDEN_SIZE, Keys.LLM_NUM_HEADS, Keys.LLM_NUM_KV_HEADS, Keys.LLM_HEAD_DIM,
           Keys.LLM_INTERMEDIATE_SIZE, Keys.LLM_VOCAB_SIZE)


def shapes_known(manifest: dict) -> bool:
    """Whether the manifest records every shape the count needs (a migrated schema-1 bundle lacks some)."""
    return all(manifest[key] is not None for key in LLM_SHAPES)


def layer_macs(manifest: dict, n: int) -> float:
    """`manifest`: a bundle manifest or export_llm's entries (the llm.* shapes)."""
    d, h, kv, dh, i = (manifest[key] for key in LLM_SHAPES[:5])
    linear = n * (d * h * dh + 2 * d * kv * dh + h * dh * d + 3 * d * i)
    return float(linear + 2 * n * n * h * dh)


def prefill_macs(manifest: dict, tokens_per_layer: list[int]) -> float:
    """MACs of a prefill whose layer l runs on tokens_per_layer[l] tokens, LM head on one token."""
    head = float(manifest[Keys.LLM_HIDDEN_SIZE] * manifest[Keys.LLM_VOCAB_SIZE])
    return sum(layer_macs(manifest, n) for n in tokens_per_layer) + head


def prefill_ratio(manifest: dict, tokens_per_layer: list[int], full_tokens: int) -> float:
    """Predicted prefill cost relative to running every layer on `full_tokens` tokens."""
    return prefill_macs(manifest, tokens_per_layer) / prefill_macs(manifest, [full_tokens] * len(tokens_per_layer))
