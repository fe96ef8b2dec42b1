"""The LLM half of a bundle: `embed.onnx` (ids -> embeddings) and `decoder.onnx` (one graph for prefill and decode).

decoder.onnx: inputs_embeds [B, L, D], position_ids [B, L] int64 (explicit: pruned sequences have gaps; [3, B, L]
for an M-RoPE LLM, rope="mrope": the (t, h, w) ids of runtime/positions.py),
attention_mask [B, past+L] int64 (1 = attend), for a DeepStack LLM (Qwen3-VL) deepstack_embeds [B, L, layers, D]
(added to the residual stream after decoder layer i, i < layers: the image tokens' DeepStack features, zeros
elsewhere), past_key_values.{i}.key/.value [B, kv_heads, past, head_dim]
-> logits [B, V] (float32, last position only), present.{i}.key/.value [B, kv_heads, past+L, head_dim].

Why our own decoder loop over the HF layers instead of calling `llm(...)`: the legacy exporter fails inside
transformers' vmap mask builder and transformers 5 dropped `DynamicCache.from_legacy_cache` (NOTES.md); walking
the layers ourselves (their own projections, norms, MLP and rotary module) needs neither, and lets us choose the
attention kernel. Parity against the HF forward is checked by `validate`.

Attention variants:
- `plain`: pure ONNX (MatMul / Softmax with an additive causal+padding mask built from arange comparisons).
- `fused`: ONNX Runtime's com.microsoft GroupQueryAttention contrib op (fused, GQA-aware, writes the present KV).
  It is an ORT-only op: fine for the LLM, which runs on ORT (or TensorRT-LLM), never through the TensorRT lint.
  Limits of the op, which the runtime respects: padding may only be on the right (the mask's row sums give the
  lengths), and a prefill with past > 0 and L > 1 (chunked prefill) needs batch 1.
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgeprune.errors import ModelError
from edgeprune.export.onnx_io import export_onnx, graph_io
from edgeprune.runtime.format import (DECODER_DEEPSTACK, DECODER_EMBEDS, DECODER_LOGITS, DECODER_MASK,
                                      DECODER_POSITIONS, DIM_BATCH, DIM_PAST, DIM_SEQUENCE, DIM_TOTAL, EMBED_INPUT, EMBED_OUTPUT, PASSED, Files,
                                      Graph, Keys, past_names, present_names)

__all__ = ["export_llm", "DecoderGraph", "EmbedGraph", "validate_llm"]

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16}
ATTENTION = ("fused", "plain")
TOLERANCE = {"float32": 1e-3, "float16": 5e-2}  # max |logit error| accepted by validation
# families whose decoder layer is exactly what DecoderGraph.forward replays (pre-norm, rotary, GQA, gated MLP);
# Gemma (scaled embeddings, 1+w norms) would need its own replay. The Qwen2-VL / Qwen2.5-VL text models are
# Qwen2 layers whose rotary module takes [3, B, L] ids and already recombines them by mrope_section into
# [B, L, head_dim] cos/sin, so the replay below is unchanged for M-RoPE.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text")
ROPE_KINDS = ("1d", "mrope")


class _GroupQueryAttention(torch.autograd.Function):
    """Exports as com.microsoft::GroupQueryAttention; the torch forward is the causal reference (no padding)."""

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, seqlens_k, total_len, num_heads: int, kv_heads: int, scale: float):
        b, l, _ = q.shape                                                   # q [B, L, H*hd], k/v [B, L, KV*hd]
        hd = past_k.shape[-1]
        present_k = torch.cat([past_k, k.reshape(b, l, kv_heads, hd).transpose(1, 2)], dim=2)  # [B, KV, T, hd]
        present_v = torch.cat([past_v, v.reshape(b, l, kv_heads, hd).transpose(1, 2)], dim=2)
        qh = q.reshape(b, l, num_heads, hd).transpose(1, 2)
        out = _plain_attention(qh, present_k, present_v, None, scale=scale)  # [B, H, L, hd]
        return out.transpose(1, 2).reshape(b, l, num_heads * hd), present_k, present_v

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, seqlens_k, total_len, num_heads, kv_heads, scale):
        out, present_k, present_v = g.op("com.microsoft::GroupQueryAttention", q, k, v, past_k, past_v, seqlens_k,
                                         total_len, num_heads_i=num_heads, kv_num_heads_i=kv_heads, scale_f=scale,
                                         outputs=3)
        out.setType(q.type())
        present_k.setType(past_k.type())
        present_v.setType(past_v.type())
        return out, present_k, present_v


def _plain_attention(q, k, v, mask, *, scale: float):
    """q [B, H, L, hd], k/v [B, KV, T, hd], mask [B, 1, 1, L, T] additive or None (= causal, no padding)."""
    b, h, l, hd = q.shape
    kv, t = k.shape[1], k.shape[2]
    # grouped query heads share a KV head: broadcast MatMul over a group axis instead of repeating K/V
    qg = q.reshape(b, kv, h // kv, l, hd)                                   # [B, KV, G, L, hd]
    scores = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)) * scale    # [B, KV, G, L, T]
    if mask is None:
        mask = _additive_mask(torch.ones(b, t, dtype=torch.int64), l, q.dtype)
    # softmax in float32 as the HF eager path does; fp16 exp overflows otherwise
    probs = torch.softmax(scores.float() + mask.float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs, v.unsqueeze(2))                               # [B, KV, G, L, hd]
    return out.reshape(b, h, l, hd)


def _additive_mask(attention_mask, length: int, dtype):
    """attention_mask [B, T] (1 = attend) -> [B, 1, 1, L, T]: 0 where the query may look, finfo.min elsewhere.

    The L queries are the last L of the T positions, in sequence order (causality follows the sequence, not the
    position ids, which may have gaps).
    """
    t = attention_mask.shape[1]
    key_idx = torch.arange(t)                                               # [T]
    query_idx = torch.arange(length) + (t - length)                         # [L]
    causal = key_idx.unsqueeze(0) <= query_idx.unsqueeze(1)                 # [L, T]
    allowed = causal.unsqueeze(0) & (attention_mask.unsqueeze(1) == 1)      # [B, L, T]
    zero = torch.zeros((), dtype=dtype)
    neg = torch.tensor(torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, zero, neg)[:, None, None]                   # [B, 1, 1, L, T]


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecoderGraph(nn.Module):
    """forward(inputs_embeds, position_ids, attention_mask, [deepstack_embeds,] *past) -> (logits, *present), past
    as k0, v0, k1, ...; deepstack_embeds only for an LLM with `deepstack_layers` > 0 (Qwen3VLTextLM)."""

    def __init__(self, llm: nn.Module, attention: str = "fused"):
        super().__init__()
        if attention not in ATTENTION:
            raise ModelError(f"attention={attention!r}; expected one of {', '.join(ATTENTION)}")
        body = getattr(llm, "model", None)
        needed = ("layers", "norm", "rotary_emb")
        if body is None or not all(hasattr(body, name) for name in needed) or llm.get_output_embeddings() is None:
            raise ModelError(f"{type(llm).__name__}: expected a Llama-style causal LM with .model.{{layers, norm, "
                             f"rotary_emb}} and an output embedding")
        cfg = llm.config
        if cfg.model_type not in FAMILIES:
            raise ModelError(f"LLM model_type {cfg.model_type!r}; export supports {', '.join(FAMILIES)}")
        rope_type = getattr(body.rotary_emb, "rope_type", "default")
        if "dynamic" in rope_type or rope_type == "longrope":  # these recompute inv_freq from the length at run time
            raise ModelError(f"rope_type {rope_type!r} depends on the sequence length; export supports static "
                             f"rope types (default, linear, llama3, yarn)")
        self.attention = attention
        self.layers, self.norm, self.rotary = body.layers, body.norm, body.rotary_emb
        self.lm_head = llm.get_output_embeddings()
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = float(self.layers[0].self_attn.scaling)
        self.deepstack_layers = int(getattr(llm, "deepstack_layers", 0))

    def forward(self, inputs_embeds, position_ids, attention_mask, *inputs):
        deepstack, past = (inputs[0], inputs[1:]) if self.deepstack_layers else (None, inputs)  # [B, L, layers, D]
        b, l, _ = inputs_embeds.shape                                       # [B, L, D]
        x = inputs_embeds
        cos, sin = self.rotary(x, position_ids)                             # [B, L, hd] each, model's rope type
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)                       # [B, L, 1, hd]
        if self.attention == "plain":
            mask = _additive_mask(attention_mask, l, x.dtype)               # [B, 1, 1, L, T], shared by all layers
        else:
            # GroupQueryAttention reads lengths, not a mask: right padding only (module docstring)
            seqlens_k = (attention_mask.sum(dim=1) - 1).to(torch.int32)     # [B]
            total_len = torch.ones_like(attention_mask[0]).sum().to(torch.int32)  # [] = past + L, kept dynamic
        presents = []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).reshape(b, l, self.num_heads, self.head_dim)  # [B, L, H, hd]
            k = attn.k_proj(h).reshape(b, l, self.kv_heads, self.head_dim)   # [B, L, KV, hd]
            v = attn.v_proj(h)                                               # [B, L, KV*hd]
            if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms come before rotary
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            past_k, past_v = past[2 * i], past[2 * i + 1]                    # [B, KV, P, hd]
            if self.attention == "plain":
                present_k = torch.cat([past_k, k.transpose(1, 2)], dim=2)    # [B, KV, T, hd]
                present_v = torch.cat([past_v, v.reshape(b, l, self.kv_heads, self.head_dim).transpose(1, 2)], dim=2)
                out = _plain_attention(q.transpose(1, 2), present_k, present_v, mask, scale=self.scale)
                out = out.transpose(1, 2).reshape(b, l, self.num_heads * self.head_dim)
            else:
                out, present_k, present_v = _GroupQueryAttention.apply(
                    q.reshape(b, l, -1), k.reshape(b, l, -1), v, past_k, past_v, seqlens_k, total_len,
                    self.num_heads, self.kv_heads, self.scale)
            x = x + attn.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            if i < self.deepstack_layers:   # DeepStack hook: image features into the residual after layer i
                x = x + deepstack[:, :, i]
            presents += [present_k, present_v]
        # only the last position's logits are needed for generation: skip the lm_head on the rest
        logits = self.lm_head(self.norm(x[:, -1])).float()                  # [B, V]
        return (logits, *presents)


class EmbedGraph(nn.Module):
    def __init__(self, llm: nn.Module):
        super().__init__()
        self.embed = llm.get_input_embeddings()

    def forward(self, input_ids):                                           # [B, L] int64
        return self.embed(input_ids)                                        # [B, L, D]


def export_llm(llm: nn.Module, out_dir: Path, *, dtype: str = "float32", attention: str = "fused",
               validate: bool = True, rope: str = "1d") -> dict:
    """Write `embed.onnx` and `decoder.onnx` (+ external weight files) to `out_dir`; return their manifest
    entries (runtime/format.py: the `llm.*` keys and positions.rope; with `validate`, also validation.llm,
    the ORT-vs-torch max absolute errors and the PASSED flag).

    Graph records name every input/output with its dims (ints, or the DIM_* names for the dynamic batch,
    sequence and past axes) and dtype. rope: "1d" (position_ids [B, L]) or "mrope" ([3, B, L], the
    adapter's `rope`; the LLM's rotary module must then have an mrope_section).
    """
    if rope not in ROPE_KINDS:
        raise ModelError(f"rope={rope!r}; expected one of {', '.join(ROPE_KINDS)}")
    if rope == "mrope" and not hasattr(getattr(getattr(llm, "model", None), "rotary_emb", None), "mrope_section"):
        raise ModelError(f"rope='mrope' but {type(llm).__name__}'s rotary module has no mrope_section")
    if dtype not in DTYPES:
        raise ModelError(f"dtype={dtype!r}; expected one of {', '.join(DTYPES)}")
    out_dir = Path(out_dir)
    # never cast the caller's model in place; and no copy when it already has the dtype (a large model is loaded in
    # float16 to be exported in float16: a second copy of its weights would not fit)
    model = llm if next(llm.parameters()).dtype == DTYPES[dtype] else copy.deepcopy(llm).to(DTYPES[dtype])
    model.eval()
    decoder = DecoderGraph(model, attention=attention).eval()
    cfg = model.config
    n_layers, kv, hd = len(decoder.layers), decoder.kv_heads, decoder.head_dim
    d, vocab = cfg.hidden_size, decoder.lm_head.out_features
    deep = decoder.deepstack_layers
    deep_in = {DECODER_DEEPSTACK: [DIM_BATCH, DIM_SEQUENCE, deep, d]} if deep else {}
    past_in, present_out = past_names(n_layers), present_names(n_layers)
    kv_in = [DIM_BATCH, kv, DIM_PAST, hd]
    kv_out = [DIM_BATCH, kv, DIM_TOTAL, hd]
    embed_io = {EMBED_INPUT: [DIM_BATCH, DIM_SEQUENCE]}, {EMBED_OUTPUT: [DIM_BATCH, DIM_SEQUENCE, d]}
    positions = [DIM_BATCH, DIM_SEQUENCE] if rope == "1d" else [3, DIM_BATCH, DIM_SEQUENCE]
    decoder_io = ({DECODER_EMBEDS: [DIM_BATCH, DIM_SEQUENCE, d], DECODER_POSITIONS: positions,
                   DECODER_MASK: [DIM_BATCH, DIM_TOTAL], **deep_in, **{n: kv_in for n in past_in}},
                  {DECODER_LOGITS: [DIM_BATCH, vocab], **{n: kv_out for n in present_out}})

    def axes(names_dims: dict) -> dict:
        return {n: {i: s for i, s in enumerate(dims) if isinstance(s, str)} for n, dims in names_dims.items()}

    # trace with past > 0 and L > 1 so no shape is specialised to 0 or 1 (batch 1 for the fused op's rule)
    b, l, p = 1, 3, 2
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (b, l), generator=g)
    embeds = torch.randn(b, l, d, generator=g).to(DTYPES[dtype])
    pos = torch.arange(p, p + l).unsqueeze(0)
    if rope == "mrope":
        pos = torch.stack([pos, pos + 1, pos + 2])                        # [3, B, L]: distinct axes
    mask = torch.ones(b, p + l, dtype=torch.int64)
    deepstack = (torch.randn(b, l, deep, d, generator=g).to(DTYPES[dtype]),) if deep else ()
    past = tuple(torch.randn(b, kv, p, hd, generator=g).to(DTYPES[dtype]) for _ in past_in)
    log.info("exporting %s", Files.EMBED)
    export_onnx(EmbedGraph(model).eval(), (ids,), out_dir / Files.EMBED, input_names=list(embed_io[0]),
                output_names=list(embed_io[1]), dynamic_axes=axes({**embed_io[0], **embed_io[1]}), external_data=True)
    log.info("exporting %s (%d layers, attention=%s, %s)", Files.DECODER, n_layers, attention, dtype)
    export_onnx(decoder, (embeds, pos, mask, *deepstack, *past), out_dir / Files.DECODER,
                input_names=list(decoder_io[0]), output_names=list(decoder_io[1]), dynamic_axes=axes({**decoder_io[0], **decoder_io[1]}),
                external_data=True)
    _stamp_io_dims(out_dir / Files.DECODER, {**decoder_io[0], **decoder_io[1]})
    entries = {
        Keys.LLM_EMBED_GRAPH: {Graph.FILE: Files.EMBED, **graph_io(out_dir / Files.EMBED)},
        Keys.LLM_DECODER_GRAPH: {Graph.FILE: Files.DECODER, **graph_io(out_dir / Files.DECODER)},
        Keys.LLM_DTYPE: dtype, Keys.LLM_ATTENTION: attention, Keys.POSITIONS_ROPE: rope,
        Keys.LLM_NUM_LAYERS: n_layers, Keys.LLM_NUM_HEADS: decoder.num_heads, Keys.LLM_NUM_KV_HEADS: kv,
        Keys.LLM_HEAD_DIM: hd, Keys.LLM_HIDDEN_SIZE: d, Keys.LLM_INTERMEDIATE_SIZE: int(cfg.intermediate_size),
        Keys.LLM_VOCAB_SIZE: vocab, Keys.LLM_CONTEXT_LENGTH: int(cfg.max_position_embeddings),
        Keys.LLM_DEEPSTACK_LAYERS: deep,
    }
    if validate:
        entries[Keys.VALIDATION_LLM] = validate_llm(model, out_dir, entries)
    return entries


def _stamp_io_dims(path: Path, dims_by_name: dict) -> None:
    """Write the intended dims on the graph's inputs/outputs: shape inference stops at the contrib op, which left
    names like 'GroupQueryAttentionpresent.0.key_dim_1' on the outputs. Weights stay in the external file."""
    model = onnx.load(str(path), load_external_data=False)
    for value in [*model.graph.input, *model.graph.output]:
        dims = dims_by_name.get(value.name)
        if dims is None:
            continue
        shape = value.type.tensor_type.shape
        shape.ClearField("dim")
        for size in dims:
            dim = shape.dim.add()
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size
    tmp = path.with_name(path.name + ".tmp")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, path)


@torch.no_grad()
def validate_llm(llm: nn.Module, bundle_dir: Path, entries: dict, *, steps: int = 4, seed: int = 0) -> dict:
    """ORT vs the HF torch forward: embed, prefill logits, then `steps` decode steps fed the same tokens.

    `entries`: export_llm's manifest entries. Positions have a gap (as after pruning) and the batch has 2 rows.
    Returns max absolute errors, the tolerance and PASSED.
    """
    from edgeprune.runtime.llm import OrtLLM  # runtime is torch-free; importing it here is the allowed direction
    from edgeprune.runtime.providers import resolve_providers

    ort_llm = OrtLLM(bundle_dir, entries, providers=resolve_providers(["cpu"]))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, entries[Keys.LLM_VOCAB_SIZE], (2, 8), generator=g)
    pos = torch.tensor([[0, 1, 2, 3, 10, 12, 13, 14]] * 2)                 # a pruned-looking gap
    if entries[Keys.POSITIONS_ROPE] == "mrope":  # text, two image tokens of a grid (t, h, w differ), text after
        pos = torch.tensor([[0, 1, 2, 3, 4, 4, 9, 10], [0, 1, 2, 3, 5, 6, 9, 10], [0, 1, 2, 3, 4, 7, 9, 10]])
        pos = pos.unsqueeze(1).expand(3, 2, 8)                             # [3, B, L]
    embeds = llm.get_input_embeddings()(ids)
    ort_embeds = ort_llm.embed(ids.numpy())
    errors = {"embed": float(np.abs(ort_embeds.astype(np.float32) - embeds.float().numpy()).max())}
    mask = torch.ones(ids.shape, dtype=torch.int64)
    extra, deepstack = {}, None
    if entries[Keys.LLM_DEEPSTACK_LAYERS]:   # DeepStack features on the two "image" positions, zeros elsewhere
        deepstack = torch.zeros(2, 8, entries[Keys.LLM_DEEPSTACK_LAYERS], entries[Keys.LLM_HIDDEN_SIZE],
                                dtype=embeds.dtype)
        deepstack[:, 4:6] = torch.randn(2, 2, *deepstack.shape[2:], generator=g).to(embeds.dtype)
        extra = {DECODER_DEEPSTACK: deepstack}
    out = llm(inputs_embeds=embeds, position_ids=pos, attention_mask=mask, use_cache=True, **extra)
    logits, present = ort_llm.step(embeds.numpy(), pos.numpy(), mask.numpy(), None,
                                   deepstack=None if deepstack is None else deepstack.numpy())
    errors["prefill"] = float(np.abs(logits - out.logits[:, -1].float().numpy()).max())
    decode = []
    cache = out.cache       # transformers 5.24's name (`past_key_values` is deprecated, removed in 5.40)
    last = pos.amax(dim=(0, 2)).unsqueeze(-1) if pos.dim() == 3 else pos[:, -1:]   # [B, 1]
    for t in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)                   # [B, 1], same token on both sides
        step_embeds = llm.get_input_embeddings()(nxt)
        step_pos = last + 1 + t
        if pos.dim() == 3:
            step_pos = step_pos.unsqueeze(0).expand(3, -1, -1)             # [3, B, 1]
        mask = torch.ones(ids.shape[0], mask.shape[1] + 1, dtype=torch.int64)
        out = llm(inputs_embeds=step_embeds, position_ids=step_pos, attention_mask=mask, cache=cache, use_cache=True)
        cache = out.cache
        logits, present = ort_llm.step(step_embeds.numpy(), step_pos.numpy(), mask.numpy(), present)
        decode.append(float(np.abs(logits - out.logits[:, -1].float().numpy()).max()))
    errors["decode"] = max(decode) if decode else 0.0
    errors["tolerance"] = TOLERANCE[entries[Keys.LLM_DTYPE]]
    errors[PASSED] = max(errors["prefill"], errors["decode"]) <= errors["tolerance"]
    (log.info if errors[PASSED] else log.warning)("LLM parity ORT vs torch: %s", errors)
    return errors
