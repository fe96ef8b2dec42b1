"""The LLM half of a bundle: `decoder.onnx`, one graph for prefill and decode, and where its embedding table is.

decoder.onnx: inputs_embeds [B, L, D], position_ids [B, L] int64 (explicit: pruned sequences have gaps; [3, B, L]
for an M-RoPE LLM, rope="mrope": the (t, h, w) ids of runtime/positions.py),
attention_mask [B, past+L] int64 (1 = attend), for a DeepStack LLM (Qwen3-VL) deepstack_embeds [B, L, layers, D]
(added to the residual stream after decoder layer i, i < layers: the image tokens' DeepStack features, zeros
elsewhere), past_key_values.{i}.key/.value [B, kv_heads, past, head_dim]
-> logits [B, V] (float32, last position only), present.{i}.key/.value [B, kv_heads, past+L, head_dim].

The token embedding table is not a graph: the runtime looks rows up with numpy (no ORT call per token). A model
whose LM head is tied to its embeddings (SmolLM2, Qwen2-VL-2B) stores the table once, as the LM head's weight
inside decoder.onnx.data; the manifest's llm.embed_table says where (file, byte offset, shape, dtype). An untied
table is written to embed.bin.

Why our own decoder loop over the HF layers instead of calling `llm(...)`: the legacy exporter fails inside
transformers' vmap mask builder and transformers 5 dropped `DynamicCache.from_legacy_cache` (NOTES.md); walking
the layers ourselves (their own projections, norms, MLP and rotary module) needs neither, and lets us choose the
kernels (export/decoder_ops.py). Parity against the HF forward is checked by `validate`.

Attention variants:
- `fused`: ONNX Runtime's contrib kernels: one QKV MatMul, GroupQueryAttention with the rotary embedding inside
  (explicit position ids, M-RoPE too), SkipSimplifiedLayerNormalization for the residual adds and RMSNorms. About
  ten kernels per layer and decode step; the KV cache lives in one buffer shared by past and present
  (llm.kv_cache "shared", runtime/llm.py). ORT-only ops (fine for the LLM, which runs on ORT, never through the TensorRT lint); needs
  onnxruntime >= MIN_ORT_FUSED. Limits of the op, which the runtime respects: padding may only be on the right
  (the mask's row sums give the lengths), and a prefill with past > 0 and L > 1 (chunked prefill) needs batch 1.
- `plain`: pure ONNX (MatMul / Softmax with an additive causal+padding mask built from arange comparisons).
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgeprune.errors import ModelError
from edgeprune.export.decoder_ops import FusedOps, PlainOps, fused_qkv, lm_head
from edgeprune.export.onnx_io import export_onnx, graph_io
from edgeprune.export.quantize import MIN_ORT_SHORTLIST, PRESETS, SHORTLIST, QuantSettings, quantize_decoder
from edgeprune.runtime.format import (DECODER_DEEPSTACK, DECODER_EMBEDS, DECODER_LOGITS, DECODER_MASK,
                                      DECODER_POSITIONS, DIM_BATCH, DIM_PAST, DIM_SEQUENCE, DIM_TOTAL, PASSED,
                                      PRECISIONS, EmbedTable, Files, Graph, Keys, Quantization, llm_precision,
                                      past_names, present_names)

__all__ = ["export_llm", "DecoderGraph", "validate_llm", "greedy_agreement", "EmbedsPrompt", "MIN_ORT_FUSED",
           "VALIDATION_PROMPTS", "VALIDATION_IMAGE", "VALIDATION_IMAGE_PROMPTS"]

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16}
ATTENTION = ("fused", "plain")
PRECISION_DTYPE = {"fp32": "float32", "fp16": "float16", "int8": "float32", "int4": "float32"}  # activations, KV
# Validation against the float32 torch model (validate_llm). fp32: max |logit diff|; the others: relative RMS
# error of the logits. MIN_AGREEMENT: teacher-forced greedy agreement under which the graph is garbage. Measured:
# the tiny random presets (flat logits, near-ties everywhere) reach 0.48 at int4 (tiny-llava); SmolLM2-135M 0.975
# at int4 (minmax; 1.0 on the image prompts; the first preset, symmetric RTN, 0.69 / 0.50) and 0.96 at int8; a
# corrupted quantization scale drops to 0.0.
TOLERANCE = {"fp32": 1e-3, "fp16": 0.05, "int8": 0.25, "int4": 1.5}
MIN_AGREEMENT = {"fp32": 0.9, "fp16": 0.5, "int8": 0.5, "int4": 0.25}
# real prompts for the greedy check (tokenised with the adapter's tokenizer and chat template by export_bundle;
# VALIDATION_IMAGE_PROMPTS are asked about VALIDATION_IMAGE, with its image tokens)
VALIDATION_PROMPTS = ("What is the capital of France?", "Describe the weather on a sunny day.",
                      "List three colours of clothing.")
VALIDATION_IMAGE = Path(__file__).resolve().parent.parent / "profiles" / "chelsea.png"   # shipped (a cat photo)
VALIDATION_IMAGE_PROMPTS = ("What is in this image?", "Describe this image in one sentence.")
# GroupQueryAttention's position_ids + query_seqlens inputs (rotary with explicit ids in a batched prompt):
# verified on 1.32; older versions either lack the inputs or apply only the first id of a prompt
MIN_ORT_FUSED = "1.32"
# families whose decoder layer is exactly what DecoderGraph.forward replays (pre-norm, rotary, GQA, gated MLP);
# Gemma (scaled embeddings, 1+w norms) would need its own replay. The Qwen2-VL / Qwen2.5-VL text models are
# Qwen2 layers whose rotary module takes [3, B, L] ids and already recombines them by mrope_section into
# [B, L, head_dim] cos/sin, so the replay below is unchanged for M-RoPE.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text")
ROPE_KINDS = ("1d", "mrope")


@dataclass(frozen=True)
class EmbedsPrompt:
    """A validation prompt given as the LLM's input embeddings (text and image tokens as the pipeline lays them
    out: reference.prefill_inputs) and their position ids: embeds [1, L, D], position_ids [1, L] or [3, 1, L]."""
    embeds: np.ndarray
    position_ids: np.ndarray


class DecoderGraph(nn.Module):
    """forward(inputs_embeds, position_ids, attention_mask, [deepstack_embeds,] *past) -> (logits, *present), past
    as k0, v0, k1, ...; deepstack_embeds only for an LLM with `deepstack_layers` > 0 (Qwen3VLTextLM).

    The residual stream is carried as (x, delta) with hidden = x + delta: each layer's last output (delta) is added
    by the next norm (SkipSimplifiedLayerNormalization adds and normalises in one kernel). `hidden(x, delta)`
    materialises it where a stage between layers needs the hidden states."""

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
        if attention == "fused" and self.head_dim % 16:
            raise ModelError(f"head_dim {self.head_dim}: GroupQueryAttention's rotary needs a multiple of 16; "
                             "export with attention='plain'")
        heads = (self.num_heads, self.kv_heads, self.head_dim)
        scale = float(self.layers[0].self_attn.scaling)
        self.ops = (FusedOps if attention == "fused" else PlainOps)(self.rotary, heads, scale)
        self.qkv = nn.ModuleList(fused_qkv(layer.self_attn) for layer in self.layers)  # one MatMul per layer
        self.deepstack_layers = int(getattr(llm, "deepstack_layers", 0))

    def forward(self, inputs_embeds, position_ids, attention_mask, *inputs):
        deepstack, past = (inputs[0], inputs[1:]) if self.deepstack_layers else (None, inputs)  # [B, L, layers, D]
        ctx = self.ops.context(inputs_embeds, position_ids, attention_mask)  # rotary, lengths: once per call
        x, delta = inputs_embeds, None
        presents = []
        for i in range(len(self.layers)):
            x, delta, present = self.layer(i, x, delta, ctx, past[2 * i], past[2 * i + 1])
            presents += present                                             # layer i's K/V: present.{i}.*
            # between layer i and i + 1: a stage that needs the hidden states works on hidden(x, delta) here
            if i < self.deepstack_layers:   # DeepStack hook: image features into the residual after layer i
                delta = delta + deepstack[:, :, i]
        return (self.logits(x, delta), *presents)

    def layer(self, i: int, x, delta, ctx, past_k, past_v):
        """Decoder layer i on the stream (x, delta) -> (x, delta, (present_k, present_v))."""
        layer = self.layers[i]
        h, x = self._add_norm(delta, x, layer.input_layernorm)
        out, present_k, present_v = self.ops.attention(self.qkv[i](h), layer.self_attn, ctx, past_k, past_v)
        h, x = self.ops.add_norm(layer.self_attn.o_proj(out), x, layer.post_attention_layernorm)
        return x, layer.mlp(h), (present_k, present_v)

    def logits(self, x, delta):
        """Final norm and LM head on the last position only (generation needs no other logits) -> [B, V] float32."""
        h, _ = self._add_norm(None if delta is None else delta[:, -1:], x[:, -1:], self.norm)
        return lm_head(h[:, 0], self.lm_head).float()

    def _add_norm(self, delta, x, module):
        return (self.ops.norm(x, module), x) if delta is None else self.ops.add_norm(delta, x, module)


def hidden(x, delta):
    """The hidden states of the residual stream (x, delta)."""
    return x if delta is None else x + delta


def export_llm(llm: nn.Module, out_dir: Path, *, precision: str = "fp32", attention: str = "fused",
               validate: bool = True, rope: str = "1d", quantization: QuantSettings | None = None,
               prompts: list | None = None, stages=None) -> dict:
    """Write `decoder.onnx` (+ decoder.onnx.data, + embed.bin for an untied embedding table) to `out_dir`; return
    their manifest entries (runtime/format.py: the `llm.*` keys and positions.rope; with `validate`, also
    validation.llm, the ORT-vs-torch max absolute errors and the PASSED flag).

    precision: "fp32" | "fp16" (float graphs) | "int8" | "int4" (float32 graph whose MatMuls are then quantized
    weight-only by export/quantize.py; `quantization` overrides the preset's settings; llm.precision and
    llm.quantization record them). The graph record names every input/output with its dims (ints, or the DIM_*
    names for the dynamic batch, sequence and past axes) and dtype; llm.embed_table says where the embedding table
    is. With `validate`, validation.llm is validate_llm's report (against the float32 torch model; `prompts`: token
    ids of real text, or EmbedsPrompt with image tokens, for its greedy check). rope: "1d" (position_ids [B, L])
    or "mrope" ([3, B, L], the adapter's `rope`; the LLM's rotary module must then have an mrope_section).
    stages: an edgeprune.inllm StageRunner built for this LLM: the in-LLM stage's own graphs instead
    (export/staged_decoder.py: the same layers with one attention mask per KV group, and prefill.onnx, both
    quantized alike at int8/int4 so they still share one weights file).
    """
    if rope not in ROPE_KINDS:
        raise ModelError(f"rope={rope!r}; expected one of {', '.join(ROPE_KINDS)}")
    if rope == "mrope" and not hasattr(getattr(getattr(llm, "model", None), "rotary_emb", None), "mrope_section"):
        raise ModelError(f"rope='mrope' but {type(llm).__name__}'s rotary module has no mrope_section")
    if precision not in PRECISIONS:
        raise ModelError(f"precision={precision!r}; expected one of {', '.join(PRECISIONS)}")
    if quantization is not None and precision not in PRESETS:
        raise ModelError(f"quantization settings given for precision={precision!r}; they apply to "
                         f"{' and '.join(PRESETS)}")
    quantization = quantization or PRESETS.get(precision)
    if quantization is not None:
        quantization.check()
    dtype = PRECISION_DTYPE[precision]
    out_dir = Path(out_dir)
    # never cast the caller's model in place; and no copy when it already has the dtype (a large model is loaded in
    # float16 to be exported in float16: a second copy of its weights would not fit)
    model = llm if next(llm.parameters()).dtype == DTYPES[dtype] else copy.deepcopy(llm).to(DTYPES[dtype])
    model.eval()
    if stages is not None:
        from edgeprune.export.staged_decoder import export_staged_llm

        return export_staged_llm(model, out_dir, dtype=dtype, precision=precision, attention=attention,
                                 validate=validate, rope=rope, stages=stages, quantization=quantization,
                                 num_parameters=sum(p.numel() for p in llm.parameters()))
    decoder = DecoderGraph(model, attention=attention).eval()
    cfg = model.config
    n_layers, kv, hd = len(decoder.layers), decoder.kv_heads, decoder.head_dim
    d, vocab = cfg.hidden_size, decoder.lm_head.out_features
    deep = decoder.deepstack_layers
    deep_in = {DECODER_DEEPSTACK: [DIM_BATCH, DIM_SEQUENCE, deep, d]} if deep else {}
    past_in, present_out = past_names(n_layers), present_names(n_layers)
    kv_in = [DIM_BATCH, kv, DIM_PAST, hd]
    kv_out = [DIM_BATCH, kv, DIM_TOTAL, hd]
    positions = [DIM_BATCH, DIM_SEQUENCE] if rope == "1d" else [3, DIM_BATCH, DIM_SEQUENCE]
    decoder_io = ({DECODER_EMBEDS: [DIM_BATCH, DIM_SEQUENCE, d], DECODER_POSITIONS: positions,
                   DECODER_MASK: [DIM_BATCH, DIM_TOTAL], **deep_in, **{n: kv_in for n in past_in}},
                  {DECODER_LOGITS: [DIM_BATCH, vocab], **{n: kv_out for n in present_out}})

    def axes(names_dims: dict) -> dict:
        return {n: {i: s for i, s in enumerate(dims) if isinstance(s, str)} for n, dims in names_dims.items()}

    # trace with past > 0 and L > 1 so no shape is specialised to 0 or 1 (batch 1 for the fused op's rule)
    b, l, p = 1, 3, 2
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(b, l, d, generator=g).to(DTYPES[dtype])
    pos = torch.arange(p, p + l).unsqueeze(0)
    if rope == "mrope":
        pos = torch.stack([pos, pos + 1, pos + 2])                        # [3, B, L]: distinct axes
    mask = torch.ones(b, p + l, dtype=torch.int64)
    deepstack = (torch.randn(b, l, deep, d, generator=g).to(DTYPES[dtype]),) if deep else ()
    past = tuple(torch.randn(b, kv, p, hd, generator=g).to(DTYPES[dtype]) for _ in past_in)
    log.info("exporting %s (%d layers, attention=%s, %s)", Files.DECODER, n_layers, attention, precision)
    export_onnx(decoder, (embeds, pos, mask, *deepstack, *past), out_dir / Files.DECODER,
                input_names=list(decoder_io[0]), output_names=list(decoder_io[1]),
                dynamic_axes=axes({**decoder_io[0], **decoder_io[1]}), external_data=True)
    _stamp_io_dims(out_dir / Files.DECODER, {**decoder_io[0], **decoder_io[1]})
    record = None
    if quantization is not None:
        log.info("quantizing %s to %s", Files.DECODER, precision)
        record = quantize_decoder(out_dir, Files.DECODER, quantization)
    entries = {
        **decoder_entries(model, decoder, out_dir, dtype=dtype, attention=attention, rope=rope, precision=precision),
        Keys.LLM_DEEPSTACK_LAYERS: deep, Keys.LLM_QUANTIZATION: record,
        Keys.LLM_KV_CACHE: "shared" if attention == "fused" else "separate",
        Keys.LLM_MIN_ONNXRUNTIME: min_onnxruntime(attention, record),
        Keys.LLM_NUM_PARAMETERS: sum(p.numel() for p in llm.parameters()),
        # no in-LLM stage: one KV group, no prefill graph (export/staged_decoder.py writes the staged ones)
        Keys.LLM_KV_GROUPS: [0], Keys.LLM_PREFILL_GRAPH: None, Keys.LLM_PREFILL_WEIGHTS: None,
    }
    if validate:
        # against the float32 model; a model loaded in float16 (--fp16, to fit memory) is never upcast for this:
        # a float32 copy of a 2B LLM adds 4x its float16 bytes to the export's peak (docs/realsize.md). It is
        # compared as exported: itself for fp16, the float32 copy made above for the other precisions.
        reference = llm if next(llm.parameters()).dtype == torch.float32 else model
        entries[Keys.VALIDATION_LLM] = validate_llm(reference, out_dir, entries, prompts=prompts)
    return entries


def decoder_entries(model: nn.Module, decoder: nn.Module, out_dir: Path, *, dtype: str, attention: str, rope: str,
                    precision: str) -> dict:
    """The manifest entries every decoder export records (export_llm, export/staged_decoder.py) once
    `out_dir`/decoder.onnx is written (and quantized): its files, the model facts and the precision."""
    cfg = model.config
    return {
        Keys.LLM_EMBED_GRAPH: None, Keys.LLM_EMBED_TABLE: embed_table(model, out_dir, Files.DECODER),
        Keys.LLM_DECODER_GRAPH: {Graph.FILE: Files.DECODER, **graph_io(out_dir / Files.DECODER)},
        Keys.LLM_DTYPE: dtype, Keys.LLM_ATTENTION: attention, Keys.POSITIONS_ROPE: rope,
        Keys.LLM_NUM_LAYERS: len(decoder.layers), Keys.LLM_NUM_HEADS: decoder.num_heads,
        Keys.LLM_NUM_KV_HEADS: decoder.kv_heads, Keys.LLM_HEAD_DIM: decoder.head_dim,
        Keys.LLM_HIDDEN_SIZE: cfg.hidden_size, Keys.LLM_INTERMEDIATE_SIZE: int(cfg.intermediate_size),
        Keys.LLM_VOCAB_SIZE: decoder.lm_head.out_features, Keys.LLM_CONTEXT_LENGTH: int(cfg.max_position_embeddings),
        Keys.LLM_PRECISION: precision,
    }


def _tied(llm: nn.Module) -> bool:
    out, inp = llm.get_output_embeddings(), llm.get_input_embeddings()
    return out is not None and out.weight.shape == inp.weight.shape and out.weight.data_ptr() == inp.weight.data_ptr()


def min_onnxruntime(attention: str, quantization: dict | None) -> str | None:
    """The oldest ONNX Runtime that runs the decoder's ops ("X.Y"), None when any recent one does."""
    from edgeprune.runtime.llm import _version   # the runtime compares versions with the same rule

    needed = [MIN_ORT_FUSED] if attention == "fused" else []
    if quantization and quantization.get(Quantization.LM_HEAD_SHORTLIST):
        needed.append(MIN_ORT_SHORTLIST)
    return max(needed, key=_version, default=None)


def embed_table(llm: nn.Module, out_dir: Path, decoder_file: str) -> dict:
    """The llm.embed_table record (runtime/embedding.py). A table tied to the LM head is that head's weight in
    the decoder's external data (stored once); an untied one is written to embed.bin."""
    weight = llm.get_input_embeddings().weight.detach()
    vocab, d = weight.shape
    dtype = str(weight.dtype).removeprefix("torch.")
    if not _tied(llm):
        (out_dir / Files.EMBED_TABLE).write_bytes(weight.contiguous().numpy().tobytes())
        return {EmbedTable.FILE: Files.EMBED_TABLE, EmbedTable.SHAPE: [vocab, d], EmbedTable.DTYPE: dtype,
                EmbedTable.TENSORS: {EmbedTable.WEIGHT: {EmbedTable.OFFSET: 0, EmbedTable.SHAPE: [vocab, d],
                                                         EmbedTable.DTYPE: dtype}}}
    model = onnx.load(str(out_dir / decoder_file), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    heads = []
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and node.input[1] in inits and list(inits[node.input[1]].dims) == [vocab, d]:
            heads.append(({EmbedTable.WEIGHT: inits[node.input[1]]}, {}))
        elif node.op_type == "MatMulNBits" and (attrs.get("N"), attrs.get("K")) == (vocab, d) \
                and not node.name.startswith(SHORTLIST):                   # a draft head is not the table
            names = dict(zip((EmbedTable.DATA, EmbedTable.SCALES, EmbedTable.ZERO_POINTS), node.input[1:4]))
            heads.append(({key: inits[name] for key, name in names.items() if name},
                          {EmbedTable.BITS: attrs["bits"], EmbedTable.BLOCK_SIZE: attrs["block_size"]}))
        elif node.op_type == "GatherBlockQuantized" and node.name.startswith(SHORTLIST):
            # the draft head's exact rows: [V, K padded] uint8 here, recorded in MatMulNBits' [V, blocks, blob] layout
            names = dict(zip((EmbedTable.DATA, EmbedTable.SCALES), node.input[0:3:2]))
            heads.append(({key: inits[name] for key, name in names.items()},
                          {EmbedTable.BITS: attrs["bits"], EmbedTable.BLOCK_SIZE: attrs["block_size"]}))
    if len(heads) != 1:
        raise ModelError(f"{decoder_file}: expected one LM head over a [{vocab}, {d}] weight, found {len(heads)}")
    tensors, extra = heads[0]
    records, files = {}, set()
    for name, t in tensors.items():
        where = _external(t)
        files.add(where["location"])
        shape = [int(v) for v in t.dims]
        if name == EmbedTable.DATA and len(shape) == 2:                    # GatherBlockQuantized's rows
            block = extra[EmbedTable.BLOCK_SIZE]
            shape = [shape[0], shape[1] * 8 // extra[EmbedTable.BITS] // block, block * extra[EmbedTable.BITS] // 8]
        records[name] = {EmbedTable.OFFSET: int(where.get("offset", 0)), EmbedTable.SHAPE: shape,
                         EmbedTable.DTYPE: onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name}
    if len(files) != 1:
        raise ModelError(f"{decoder_file}: the LM head's tensors lie in {len(files)} files, expected one")
    return {EmbedTable.FILE: files.pop(), EmbedTable.SHAPE: [vocab, d], EmbedTable.DTYPE: dtype, **extra,
            EmbedTable.TENSORS: records}


def _external(tensor) -> dict:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        raise ModelError(f"initializer {tensor.name!r} is stored inside the graph, not in its external data")
    return {entry.key: entry.value for entry in tensor.external_data}


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
def validate_llm(llm: nn.Module, bundle_dir: Path, entries: dict, *, steps: int = 4, seed: int = 0,
                 prompts: list | None = None, new_tokens: int = 16) -> dict:
    """The exported graph (at its precision) against the HF torch model `llm` (float32, or float16 as a --fp16
    export loaded it: export_llm never upcasts a copy for this), through the runtime's own path
    (OrtLLM.forward with its KV cache and embedding table). `entries`: export_llm's manifest entries.

    1. Logits: prefill on seeded embeddings with a position gap (as after pruning), batch 2, then `steps` decode
       steps fed the same tokens. fp32 must match to TOLERANCE (max |logit diff|); the other precisions are held
       to a relative RMS error (RMS of the difference / RMS of the reference logits around their mean) of
       TOLERANCE[precision].
    2. Greedy tokens: torch's greedy continuation (`new_tokens`) of each prompt in `prompts` (token ids: real text
       from the adapter's tokenizer; EmbedsPrompt: a real prompt with image tokens, export/bundle.py
       validation_prompts; seeded ids when None), teacher-forced through the runtime: the share of steps whose
       argmax equals torch's token, over all prompts (greedy_agreement) and over those with image tokens
       (greedy_agreement_image). A flipped near-tie is normal below fp32; only agreement under
       MIN_AGREEMENT[precision] (garbage), overall or with image tokens, fails.
    Returns the errors, the agreement, the tolerance and PASSED.
    """
    from edgeprune.runtime.format import optional_keys
    from edgeprune.runtime.llm import OrtLLM  # runtime is torch-free; importing it here is the allowed direction
    from edgeprune.runtime.providers import resolve_providers

    entries = {**{key: key.default for key in optional_keys()}, **entries}   # as format.read fills them
    precision = llm_precision(entries)
    ort_llm = OrtLLM(bundle_dir, entries, providers=resolve_providers(["cpu"]))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, entries[Keys.LLM_VOCAB_SIZE], (2, 8), generator=g)
    pos = torch.tensor([[0, 1, 2, 3, 10, 12, 13, 14]] * 2)                 # a pruned-looking gap
    if entries[Keys.POSITIONS_ROPE] == "mrope":  # text, two image tokens of a grid (t, h, w differ), text after
        pos = torch.tensor([[0, 1, 2, 3, 4, 4, 9, 10], [0, 1, 2, 3, 5, 6, 9, 10], [0, 1, 2, 3, 4, 7, 9, 10]])
        pos = pos.unsqueeze(1).expand(3, 2, 8)                             # [3, B, L]
    embeds = llm.get_input_embeddings()(ids)
    errors = {"embed": float(np.abs(ort_llm.embed(ids.numpy()).astype(np.float32) - embeds.numpy()).max())}
    extra, deepstack = {}, None
    if entries[Keys.LLM_DEEPSTACK_LAYERS]:   # DeepStack features on the two "image" positions, zeros elsewhere
        deepstack = torch.zeros(2, 8, entries[Keys.LLM_DEEPSTACK_LAYERS], entries[Keys.LLM_HIDDEN_SIZE],
                                dtype=embeds.dtype)
        deepstack[:, 4:6] = torch.randn(2, 2, *deepstack.shape[2:], generator=g).to(embeds.dtype)
        extra = {DECODER_DEEPSTACK: deepstack}
    out = llm(inputs_embeds=embeds, position_ids=pos, attention_mask=torch.ones(ids.shape, dtype=torch.int64),
              use_cache=True, **extra)
    kv = ort_llm.new_cache(ids.shape[0], ids.shape[1] + steps)
    logits = ort_llm.forward(embeds.numpy().astype(ort_llm.dtype), pos.numpy(), kv,
                             deepstack=None if deepstack is None else deepstack.numpy())
    diffs = {"prefill": [_logit_errors(logits, out.logits[:, -1])], "decode": []}
    cache = out.cache       # transformers 5.24's name (`past_key_values` is deprecated, removed in 5.40)
    last = pos.amax(dim=(0, 2)).unsqueeze(-1) if pos.dim() == 3 else pos[:, -1:]   # [B, 1]
    for t in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)                   # [B, 1], same token on both sides
        step_pos = last + 1 + t
        if pos.dim() == 3:
            step_pos = step_pos.unsqueeze(0).expand(3, -1, -1)             # [3, B, 1]
        out = llm(inputs_embeds=llm.get_input_embeddings()(nxt), position_ids=step_pos, cache=cache,
                  attention_mask=torch.ones(ids.shape[0], ids.shape[1] + t + 1, dtype=torch.int64), use_cache=True)
        cache = out.cache
        logits = ort_llm.forward(ort_llm.embed(nxt.numpy()), step_pos.numpy(), kv)   # the runtime's own rows
        diffs["decode"].append(_logit_errors(logits, out.logits[:, -1]))
    for part, values in diffs.items():
        errors[part] = max(v[0] for v in values) if values else 0.0
        errors[f"{part}_relative"] = max(v[1] for v in values) if values else 0.0
    metric = "max_abs" if precision == "fp32" else "relative_rms"
    worst = max(errors["prefill"], errors["decode"]) if metric == "max_abs" else \
        max(errors["prefill_relative"], errors["decode_relative"])
    prompts = prompts or ids.tolist()
    rope = entries[Keys.POSITIONS_ROPE]
    agreement, tokens = greedy_agreement(llm, ort_llm, prompts, new_tokens, rope=rope)
    errors.update(metric=metric, tolerance=TOLERANCE[precision], greedy_agreement=agreement, greedy_tokens=tokens,
                  min_agreement=MIN_AGREEMENT[precision])
    with_images = [p for p in prompts if isinstance(p, EmbedsPrompt)]
    if with_images:   # also on its own: the image tokens (soft embeddings) are what weight noise hurts most
        errors["greedy_agreement_image"], errors["greedy_tokens_image"] = greedy_agreement(
            llm, ort_llm, with_images, new_tokens, rope=rope)
    errors[PASSED] = worst <= errors["tolerance"] and agreement >= errors["min_agreement"] and \
        errors.get("greedy_agreement_image", 1.0) >= errors["min_agreement"]
    (log.info if errors[PASSED] else log.warning)("LLM parity ORT (%s) vs torch %s: %s", precision,
                                                  str(next(llm.parameters()).dtype).removeprefix("torch."), errors)
    return errors


def _logit_errors(ort_logits: np.ndarray, torch_logits) -> tuple[float, float]:
    """(max |diff|, relative RMS: RMS(diff) / RMS(reference - its mean)) of [B, V] logits."""
    ref = torch_logits.float().numpy()
    diff = ort_logits.astype(np.float64) - ref
    spread = np.sqrt(((ref - ref.mean(-1, keepdims=True)) ** 2).mean())
    return float(np.abs(diff).max()), float(np.sqrt((diff ** 2).mean()) / max(spread, 1e-12))


@torch.no_grad()
def greedy_agreement(llm: nn.Module, ort_llm, prompts: list, new_tokens: int, rope: str = "1d"
                     ) -> tuple[float, int]:
    """Share of teacher-forced steps where the runtime's argmax equals torch's greedy token (module docstring of
    validate_llm). A prompt is token ids (text at positions 0..L-1; M-RoPE: the same id on the three axes), or
    an EmbedsPrompt (a prompt with image tokens as the pipeline lays it out: the same embeddings and position ids
    fed to both sides). Decode steps continue from the largest position id, each side embedding the token with
    its own table."""
    matches = total = 0
    table = llm.get_input_embeddings()
    dtype = next(llm.parameters()).dtype
    for prompt in prompts:
        if isinstance(prompt, EmbedsPrompt):
            embeds = torch.from_numpy(np.asarray(prompt.embeds)).to(dtype)                 # [1, L, D]
            pos = torch.from_numpy(np.asarray(prompt.position_ids, dtype=np.int64))       # [1, L] or [3, 1, L]
            ort_embeds = embeds.numpy().astype(ort_llm.dtype)
        else:
            ids = torch.tensor([prompt])
            embeds, pos = table(ids), torch.arange(len(prompt))[None]
            if rope == "mrope":
                pos = pos.expand(3, 1, -1)
            ort_embeds = ort_llm.embed(ids.numpy())
        length, start = embeds.shape[1], int(pos.max()) + 1
        kv = ort_llm.new_cache(1, length + new_tokens)
        logits = ort_llm.forward(ort_embeds, pos.numpy(), kv)
        out = llm(inputs_embeds=embeds, position_ids=pos, use_cache=True)
        for t in range(new_tokens):
            want = int(out.logits[0, -1].argmax())
            matches += int(logits[0].argmax()) == want
            total += 1
            step = torch.tensor([[want]])
            step_pos = torch.full((1, 1), start + t) if pos.dim() == 2 else torch.full((3, 1, 1), start + t)
            out = llm(inputs_embeds=table(step), position_ids=step_pos, cache=out.cache,
                      use_cache=True)
            logits = ort_llm.forward(ort_llm.embed(step.numpy()), step_pos.numpy(), kv)
    return (matches / total if total else 1.0), total
