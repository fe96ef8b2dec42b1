"""The LLM graphs of a bundle with an in-LLM stage: decoder.onnx (decode, one attention mask per KV group) and the
layer loop prefill.onnx runs (export/inllm.py), with the model's own q/k/v projections and rotary in the graph.

Why not the fused decoder of export/llm.py (one QKV MatMul, GroupQueryAttention with the rotary inside, shared KV
buffer): a stage reads the post-RoPE keys and the query rows of layer L-1 and gathers the KV cache between layers,
and its "faithful" policy gives layer groups caches of different lengths; the fused graph computes the rotary
inside the attention kernel and keeps one buffer for every layer. Fusing the staged graph is left for later
(issue 13): these bundles run this unfused graph ("separate" KV cache), and `edgeprune inspect` says so.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from edgeprune.errors import ModelError
from edgeprune.export.decoder_ops import additive_mask, lm_head, plain_attention, rotate_half
from edgeprune.export.llm import DecoderGraph
from edgeprune.inllm.boundary import LLMParts, PrefillState

__all__ = ["StagedDecoderGraph"]

log = logging.getLogger(__name__)


class _GroupQueryAttentionNoRotary(torch.autograd.Function):
    """Exports as com.microsoft::GroupQueryAttention on rotated q/k (no rotary inside); the torch forward is the
    causal reference (no padding)."""

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, seqlens_k, total_len, num_heads: int, kv_heads: int, scale: float):
        b, l, _ = q.shape                                                   # q [B, L, H*hd], k/v [B, L, KV*hd]
        hd = past_k.shape[-1]
        present_k = torch.cat([past_k, k.reshape(b, l, kv_heads, hd).transpose(1, 2)], dim=2)  # [B, KV, T, hd]
        present_v = torch.cat([past_v, v.reshape(b, l, kv_heads, hd).transpose(1, 2)], dim=2)
        qh = q.reshape(b, l, num_heads, hd).transpose(1, 2)
        out = plain_attention(qh, present_k, present_v, None, scale=scale)  # [B, H, L, hd]
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


class StagedDecoderGraph(DecoderGraph):
    """forward(inputs_embeds, position_ids, *attention_masks, *past) -> (logits, *present), past as k0, v0, k1, ...

    kv_groups: first layer of each group of layers whose caches have their own length (the "faithful" policy
    of an in-LLM stage: layers before and after L); one attention mask input per group, in that order,
    before the past. `run` is the whole computation; the prefill graph of an in-LLM stage (export/inllm.py)
    calls it with a StageRunner.
    """

    def __init__(self, llm: nn.Module, attention: str = "fused", kv_groups: tuple[int, ...] = (0,)):
        super().__init__(llm, attention)   # the family, rope and head checks; the layers, norm, rotary, LM head
        if self.deepstack_layers:   # its per-token features would have to be gathered with the kept tokens
            raise ModelError(f"an in-LLM stage on a DeepStack LLM ({self.deepstack_layers} layers take image "
                             "features, Qwen3-VL): not supported; prune before the LLM instead")
        del self.qkv   # this graph keeps the model's own q/k/v projections (the stage reads q and k per head)
        self.scale = float(self.layers[0].self_attn.scaling)
        self.kv_groups = tuple(kv_groups)
        self.parts = LLMParts(self.layers, self.rotary, self.norm, self.num_heads, self.kv_heads, self.head_dim,
                              self.scale)   # what an in-LLM stage reads (plain references, not submodules)

    def forward(self, inputs_embeds, position_ids, *masks_and_past):
        g = len(self.kv_groups)
        logits, presents, _ = self.run(inputs_embeds, position_ids, list(masks_and_past[:g]), masks_and_past[g:])
        return (logits, *presents)

    def _context(self, x, position_ids, attention_mask):
        """What each layer of one KV group needs: rotary cos/sin and the mask in the attention kernel's form."""
        cos, sin = self.rotary(x, position_ids)                             # [B, L, hd] each, model's rope type
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)                       # [B, L, 1, hd]
        if self.attention == "plain":
            return cos, sin, additive_mask(attention_mask, x.shape[1], x.dtype)  # [B, 1, 1, L, T]
        # GroupQueryAttention reads lengths, not a mask: right padding only (module docstring)
        seqlens_k = (attention_mask.sum(dim=1) - 1).to(torch.int32)         # [B]
        total_len = torch.ones_like(attention_mask[0]).sum().to(torch.int32)  # [] = past + L, kept dynamic
        return cos, sin, (seqlens_k, total_len)

    def _layer(self, layer, x, context, past_k, past_v):
        b, l, _ = x.shape
        cos, sin, mask = context
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).reshape(b, l, self.num_heads, self.head_dim)      # [B, L, H, hd]
        k = attn.k_proj(h).reshape(b, l, self.kv_heads, self.head_dim)       # [B, L, KV, hd]
        v = attn.v_proj(h)                                                   # [B, L, KV*hd]
        if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms come before rotary
            q, k = attn.q_norm(q), attn.k_norm(k)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.attention == "plain":
            present_k = torch.cat([past_k, k.transpose(1, 2)], dim=2)        # [B, KV, T, hd]
            present_v = torch.cat([past_v, v.reshape(b, l, self.kv_heads, self.head_dim).transpose(1, 2)], dim=2)
            out = plain_attention(q.transpose(1, 2), present_k, present_v, mask, scale=self.scale)
            out = out.transpose(1, 2).reshape(b, l, self.num_heads * self.head_dim)
        else:
            out, present_k, present_v = _GroupQueryAttentionNoRotary.apply(
                q.reshape(b, l, -1), k.reshape(b, l, -1), v, past_k, past_v, *mask,
                self.num_heads, self.kv_heads, self.scale)
        x = x + attn.o_proj(out)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x, present_k, present_v

    def run(self, x, position_ids, masks: list, past, stages=None, image_positions=None):
        """x [B, L, D], position_ids, one attention mask per KV group, past [k0, v0, ...] -> (logits [B, V],
        presents, kept image slots per in-LLM stage). `stages`: an edgeprune.inllm StageRunner (prefill only,
        one mask), with `image_positions` [B, K]."""
        contexts = [self._context(x, position_ids, m) for m in masks]
        presents, keeps, slots, x_in = [], [], None, x
        for i, layer in enumerate(self.layers):
            if stages is not None and i in stages.layers:  # -- in-LLM stage between layer i-1 and i (edgeprune/inllm)
                state = stages.apply(i, PrefillState(
                    hidden=x, layer_input=x_in, position_ids=position_ids, attention_mask=masks[0], presents=presents,
                    slots=stages.initial_slots(image_positions) if slots is None else slots,
                    image_positions=image_positions), self.parts)
                x, position_ids, masks, presents = state.hidden, state.position_ids, [state.attention_mask], \
                    state.presents
                slots = state.slots
                keeps.append(slots)
                contexts = [self._context(x, position_ids, masks[0])]    # -- end of the stage hook
            group = sum(1 for start in self.kv_groups[1:] if start <= i) if len(contexts) > 1 else 0
            x_in = x
            x, present_k, present_v = self._layer(layer, x, contexts[group], past[2 * i], past[2 * i + 1])
            presents += [present_k, present_v]
        # only the last valid position's logits are needed: skip the lm_head on the rest. Right padding: a
        # prefill row's last real token is at (valid count - 1); in decode (past > 0) clamping gives row 0.
        mask = masks[-1]
        last = (mask.sum(dim=1) - 1 - (mask.shape[1] - x.shape[1])).clamp_min(0)          # [B]
        x_last = torch.gather(x, 1, last.view(-1, 1, 1).expand(-1, 1, x.shape[-1]))[:, 0]  # [B, D]
        logits = lm_head(self.norm(x_last), self.lm_head).float()                   # [B, V]
        return logits, presents, keeps




def export_staged_llm(model: nn.Module, out_dir: Path, *, dtype: str, precision: str, attention: str,
                      validate: bool, rope: str, stages, num_parameters: int) -> dict:
    """export_llm for an in-LLM stage (`stages`: an edgeprune.inllm StageRunner): decoder.onnx from
    StagedDecoderGraph (one attention mask per KV group of its policy, llm.kv_groups), prefill.onnx sharing its
    weights (export/inllm.py), the embedding table; returns the manifest entries (`model`: in the export dtype)."""
    from edgeprune.export.inllm import export_prefill, validate_prefill
    from edgeprune.export.llm import _stamp_io_dims, decoder_entries, validate_llm
    from edgeprune.export.onnx_io import export_onnx
    from edgeprune.runtime.format import (DECODER_EMBEDS, DECODER_LOGITS, DECODER_POSITIONS, DIM_BATCH, DIM_PAST,
                                          DIM_SEQUENCE, DIM_TOTAL, PASSED, Files, Keys, group_mask_name,
                                          past_names, present_names)

    groups = stages.kv_groups()
    decoder = StagedDecoderGraph(model, attention=attention, kv_groups=groups).eval()
    cfg = model.config
    n_layers, kv, hd = len(decoder.layers), decoder.kv_heads, decoder.head_dim
    d, vocab = cfg.hidden_size, decoder.lm_head.out_features
    past_in, present_out = past_names(n_layers), present_names(n_layers)

    def group_dim(name: str, g: int) -> str:   # KV groups have their own lengths: "past_sequence.1", ...
        return name if g == 0 else f"{name}.{g}"

    group_of = [sum(1 for start in groups[1:] if start <= i) for i in range(n_layers)]
    masks = {group_mask_name(g): [DIM_BATCH, group_dim(DIM_TOTAL, g)] for g in range(len(groups))}
    positions = [DIM_BATCH, DIM_SEQUENCE] if rope == "1d" else [3, DIM_BATCH, DIM_SEQUENCE]
    inputs = {DECODER_EMBEDS: [DIM_BATCH, DIM_SEQUENCE, d], DECODER_POSITIONS: positions, **masks,
              **{n: [DIM_BATCH, kv, group_dim(DIM_PAST, group_of[j // 2]), hd] for j, n in enumerate(past_in)}}
    outputs = {DECODER_LOGITS: [DIM_BATCH, vocab],
               **{n: [DIM_BATCH, kv, group_dim(DIM_TOTAL, group_of[j // 2]), hd] for j, n in enumerate(present_out)}}
    # trace with past > 0 and L > 1 so no shape is specialised to 0 or 1 (batch 1 for the fused op's rule)
    b, l, p = 1, 3, 2
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(b, l, d, generator=g).to(next(model.parameters()).dtype)
    pos = torch.arange(p, p + l).unsqueeze(0)
    if rope == "mrope":
        pos = torch.stack([pos, pos + 1, pos + 2])                        # [3, B, L]: distinct axes
    mask = torch.ones(b, p + l, dtype=torch.int64)
    past = tuple(torch.randn(b, kv, p, hd, generator=g).to(embeds.dtype) for _ in past_in)
    log.info("exporting %s for the in-LLM stage (%d layers, %d KV group(s), attention=%s, %s)", Files.DECODER,
             n_layers, len(groups), attention, dtype)
    export_onnx(decoder, (embeds, pos, *[mask] * len(groups), *past), out_dir / Files.DECODER,
                input_names=list(inputs), output_names=list(outputs), dynamic_axes=dynamic_axes({**inputs, **outputs}),
                external_data=True)
    _stamp_io_dims(out_dir / Files.DECODER, {**inputs, **outputs})
    entries = {
        **decoder_entries(model, decoder, out_dir, dtype=dtype, attention=attention, rope=rope, precision=precision),
        Keys.LLM_DEEPSTACK_LAYERS: 0, Keys.LLM_QUANTIZATION: None,
        Keys.LLM_KV_CACHE: "separate",   # numpy past/present: KV groups of different lengths under "faithful"
        Keys.LLM_MIN_ONNXRUNTIME: None, Keys.LLM_NUM_PARAMETERS: num_parameters,
        Keys.LLM_KV_GROUPS: list(groups), Keys.LLM_PREFILL_GRAPH: None, Keys.LLM_PREFILL_WEIGHTS: None,
    }
    entries[Keys.LLM_PREFILL_GRAPH], entries[Keys.LLM_PREFILL_WEIGHTS] = export_prefill(
        decoder, stages, out_dir, entries, model.get_input_embeddings())
    if validate:
        # the decoder graph alone first; then the prefill graph against the torch reference loop
        entries[Keys.VALIDATION_LLM] = check = validate_llm(model, out_dir, {**entries, Keys.LLM_PREFILL_GRAPH: None})
        check["prefill_stage"] = stage_check = validate_prefill(model, stages, out_dir, entries)
        check[PASSED] = check[PASSED] and stage_check[PASSED]
    return entries


def dynamic_axes(names_dims: dict) -> dict:
    """{name: dims} -> torch.onnx's dynamic_axes: the string dims are the dynamic ones."""
    return {n: {i: s for i, s in enumerate(dims) if isinstance(s, str)} for n, dims in names_dims.items()}
