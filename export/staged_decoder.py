"""The LLM graphs of a bundle with an in-LLM stage: decoder.onnx (decode, one attention mask per KV group) and the
layer loop prefill.onnx runs (export/inllm.py).

The layers are export/llm.py's DecoderGraph layers, in the same kernels (`fused`: one QKV MatMul,
GroupQueryAttention with the rotary inside at the explicit, gapped position ids, SkipSimplifiedLayerNormalization
for the residual adds; `plain`: standard ONNX). What a stage reads is all there: the post-RoPE keys of layer L-1
are its present K (the kernel rotates before it writes the cache), the hidden states are the residual stream
materialised at the boundary, and the query rows are projected from the input of layer L-1 (materialised
before that layer) with the layer's own fused QKV weight (inllm/boundary.py last_token_attention).
What differs from export/llm.py's graph: one attention mask per KV group (the "faithful" policy gives layers
before and after L caches of different lengths), so the KV cache is "separate" (numpy past/present, never one
shared buffer), and the logits are those of each row's last valid token.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from edgeprune.errors import ModelError
from edgeprune.export.decoder_ops import lm_head
from edgeprune.export.llm import DecoderGraph, hidden
from edgeprune.export.quantize import quantize_decoder
from edgeprune.inllm.boundary import LLMParts, PrefillState

__all__ = ["StagedDecoderGraph"]

log = logging.getLogger(__name__)


class StagedDecoderGraph(DecoderGraph):
    """forward(inputs_embeds, position_ids, *attention_masks, *past) -> (logits, *present), past as k0, v0, k1, ...

    kv_groups: first layer of each group of layers whose caches have their own length (the "faithful" policy
    of an in-LLM stage: layers before and after L); one attention mask input per group, in that order,
    before the past. `run` is the whole computation; the prefill graph of an in-LLM stage (export/inllm.py)
    calls it with a StageRunner.
    """

    def __init__(self, llm: nn.Module, attention: str = "fused", kv_groups: tuple[int, ...] = (0,)):
        super().__init__(llm, attention)   # the family, rope and head checks; layers, norm, rotary, fused QKV, LM head
        if self.deepstack_layers:   # its per-token features would have to be gathered with the kept tokens
            raise ModelError(f"an in-LLM stage on a DeepStack LLM ({self.deepstack_layers} layers take image "
                             "features, Qwen3-VL): not supported; prune before the LLM instead")
        self.scale = float(self.layers[0].self_attn.scaling)
        self.kv_groups = tuple(kv_groups)
        self.parts = LLMParts(self.layers, self.rotary, self.norm, self.num_heads, self.kv_heads, self.head_dim,
                              self.scale, qkv=self.qkv)   # what an in-LLM stage reads (references, not copies)

    def forward(self, inputs_embeds, position_ids, *masks_and_past):
        g = len(self.kv_groups)
        logits, presents, _ = self.run(inputs_embeds, position_ids, list(masks_and_past[:g]), masks_and_past[g:])
        return (logits, *presents)

    def run(self, x, position_ids, masks: list, past, stages=None, image_positions=None):
        """x [B, L, D], position_ids, one attention mask per KV group, past [k0, v0, ...] -> (logits [B, V],
        presents, kept image slots per in-LLM stage). `stages`: an edgeprune.inllm StageRunner (prefill only,
        one mask), with `image_positions` [B, K]."""
        contexts = [self.ops.context(x, position_ids, m) for m in masks]   # rotary tables, lengths: per KV group
        presents, keeps, slots, delta, x_in = [], [], None, None, None
        boundaries = () if stages is None else stages.layers
        for i in range(len(self.layers)):
            if i in boundaries:   # -- in-LLM stage between layer i-1 and i (edgeprune/inllm)
                state = stages.apply(i, PrefillState(
                    hidden=hidden(x, delta), layer_input=x_in, position_ids=position_ids, attention_mask=masks[0],
                    presents=presents, slots=stages.initial_slots(image_positions) if slots is None else slots,
                    image_positions=image_positions), self.parts)
                x, delta, position_ids, masks = state.hidden, None, state.position_ids, [state.attention_mask]
                presents, slots = state.presents, state.slots
                keeps.append(slots)
                contexts = [self.ops.context(x, position_ids, masks[0])]   # -- end of the stage hook
            if i + 1 in boundaries:   # the stage recomputes query rows from this layer's input: materialise it
                x, delta = hidden(x, delta), None
                x_in = x
            group = sum(1 for start in self.kv_groups[1:] if start <= i) if len(contexts) > 1 else 0
            x, delta, present = self.layer(i, x, delta, contexts[group], past[2 * i], past[2 * i + 1])
            presents += present
        # only the last valid position's logits are needed: skip the lm_head on the rest. Right padding: a
        # prefill row's last real token is at (valid count - 1); in decode (past > 0) clamping gives row 0.
        mask = masks[-1]
        last = (mask.sum(dim=1) - 1 - (mask.shape[1] - x.shape[1])).clamp_min(0).view(-1, 1, 1)   # [B, 1, 1]
        x_last = torch.gather(x, 1, last.expand(-1, 1, x.shape[-1]))                               # [B, 1, D]
        delta_last = None if delta is None else torch.gather(delta, 1, last.expand(-1, 1, delta.shape[-1]))
        h, _ = self._add_norm(delta_last, x_last, self.norm)
        return lm_head(h[:, 0], self.lm_head).float(), presents, keeps                             # [B, V]


def export_staged_llm(model: nn.Module, out_dir: Path, *, dtype: str, precision: str, attention: str,
                      validate: bool, rope: str, stages, num_parameters: int, quantization=None) -> dict:
    """export_llm for an in-LLM stage (`stages`: an edgeprune.inllm StageRunner): decoder.onnx from
    StagedDecoderGraph (one attention mask per KV group of its policy, llm.kv_groups), prefill.onnx sharing its
    weights (export/inllm.py), the embedding table; returns the manifest entries (`model`: in the export dtype).
    quantization (int8/int4, export/quantize.py): both graphs are quantized with the same settings; the quantizer
    is deterministic, so their weights stay byte-identical and are still stored once."""
    from edgeprune.export.inllm import export_prefill, validate_prefill
    from edgeprune.export.llm import _stamp_io_dims, decoder_entries, min_onnxruntime, validate_llm
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
    record = None
    if quantization is not None:
        log.info("quantizing %s to %s", Files.DECODER, precision)
        record = quantize_decoder(out_dir, Files.DECODER, quantization)
    entries = {
        **decoder_entries(model, decoder, out_dir, dtype=dtype, attention=attention, rope=rope, precision=precision),
        Keys.LLM_DEEPSTACK_LAYERS: 0, Keys.LLM_QUANTIZATION: record,
        Keys.LLM_KV_CACHE: "separate",   # numpy past/present: KV groups of different lengths under "faithful"
        Keys.LLM_MIN_ONNXRUNTIME: min_onnxruntime(attention, record),   # GroupQueryAttention's rotary, the draft head
        Keys.LLM_NUM_PARAMETERS: num_parameters,
        Keys.LLM_KV_GROUPS: list(groups), Keys.LLM_PREFILL_GRAPH: None, Keys.LLM_PREFILL_WEIGHTS: None,
    }
    entries[Keys.LLM_PREFILL_GRAPH], entries[Keys.LLM_PREFILL_WEIGHTS] = export_prefill(
        decoder, stages, out_dir, entries, model.get_input_embeddings(), quantization=quantization)
    if validate:
        # the decoder graph alone first; then the prefill graph against the torch reference loop
        entries[Keys.VALIDATION_LLM] = check = validate_llm(model, out_dir, {**entries, Keys.LLM_PREFILL_GRAPH: None})
        check["prefill_stage"] = stage_check = validate_prefill(model, stages, out_dir, entries)
        check[PASSED] = check[PASSED] and stage_check[PASSED]
    return entries


def dynamic_axes(names_dims: dict) -> dict:
    """{name: dims} -> torch.onnx's dynamic_axes: the string dims are the dynamic ones."""
    return {n: {i: s for i, s in enumerate(dims) if isinstance(s, str)} for n, dims in names_dims.items()}
