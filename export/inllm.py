"""The prefill graph of an in-LLM stage (METHODS_INLLM.md): `prefill.onnx` beside `decoder.onnx`.

Why two graphs: the stage runs once per image, in the prefill; decode never prunes (query length 1,
G9), and an ONNX If around two layer stacks would hide the stack from ORT's fusions. So the prefill
is its own graph (no past inputs: a prefill starts from an empty cache) and decode uses the ordinary
decoder graph (with one attention mask per KV group under the "faithful" policy). The two graphs
have the same weights: `share_weights` points every initializer of prefill.onnx at the identical
bytes in decoder.onnx.data, so the bundle holds one copy (the few prefill-only constants stay inline).

prefill.onnx: inputs_embeds [B, L, D], position_ids [B, L] ([3, B, L] M-RoPE), attention_mask [B, L]
(right padding), image_positions [B, K] -> logits [B, V], image_keep.{s} [B, K_s] per stage,
present.{i}.key/value [B, kv, len_i, hd] (len_i: the sequence layer i's cache holds, runtime/stages.py).
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import external_data_helper
from torch import nn

from edgeprune.export.llm import MIN_AGREEMENT, TOLERANCE, _logit_errors, _stamp_io_dims
from edgeprune.export.onnx_io import export_onnx, graph_io
from edgeprune.export.quantize import PRESETS, quantize_decoder
from edgeprune.inllm.boundary import StageRunner
from edgeprune.runtime.format import (DECODER_EMBEDS, DECODER_LOGITS, DECODER_POSITIONS, DIM_BATCH, DIM_SEQUENCE,
                                      PASSED, PREFILL_IMAGE_POSITIONS, Files, Graph, Keys, external_data,
                                      group_mask_name, present_name, stage_keep_name)
from edgeprune.runtime.providers import resolve_providers
from edgeprune.runtime.positions import build_positions_rows

__all__ = ["PrefillGraph", "export_prefill", "prefill_io", "share_weights", "validate_prefill", "sample_prompt_batch"]

log = logging.getLogger(__name__)


class PrefillGraph(nn.Module):
    """forward(inputs_embeds, position_ids, attention_mask, image_positions) -> (logits, *image_keep, *present)."""

    def __init__(self, decoder, runner: StageRunner):
        super().__init__()
        self.decoder, self.runner = decoder, runner

    def forward(self, inputs_embeds, position_ids, attention_mask, image_positions):
        d = self.decoder
        empty = inputs_embeds.new_zeros(inputs_embeds.shape[0], d.kv_heads, 0, d.head_dim)   # a prefill's past
        logits, presents, keeps = d.run(inputs_embeds, position_ids, [attention_mask], [empty] * (2 * len(d.layers)),
                                        stages=self.runner, image_positions=image_positions)
        return (logits, *keeps, *presents)


def prefill_io(runner: StageRunner, *, hidden: int, vocab: int, kv_heads: int, head_dim: int,
               rope: str) -> tuple[dict, dict]:
    """prefill.onnx's (inputs, outputs) with their dims (export/llm.py's form)."""
    groups = runner.kv_groups()
    seq = [DIM_SEQUENCE] + [f"{DIM_SEQUENCE}.{s + 1}" for s in range(len(runner.stages))]   # after each stage
    presents = {}
    for i in range(runner.num_layers):
        after = sum(1 for layer in runner.layers if layer <= i)          # stages run before layer i
        length = seq[len(runner.stages)] if groups == (0,) else seq[after]
        for kind in ("key", "value"):
            presents[present_name(i, kind)] = [DIM_BATCH, kv_heads, length, head_dim]
    inputs = {DECODER_EMBEDS: [DIM_BATCH, DIM_SEQUENCE, hidden],
              DECODER_POSITIONS: [DIM_BATCH, DIM_SEQUENCE] if rope == "1d" else [3, DIM_BATCH, DIM_SEQUENCE],
              group_mask_name(0): [DIM_BATCH, DIM_SEQUENCE],
              PREFILL_IMAGE_POSITIONS: [DIM_BATCH, runner.num_image]}
    outputs = {DECODER_LOGITS: [DIM_BATCH, vocab],
               **{stage_keep_name(s): [DIM_BATCH, st.num_out] for s, st in enumerate(runner.stages)}, **presents}
    return inputs, outputs


def export_prefill(decoder, runner: StageRunner, out_dir: Path, entries: dict,
                   embed: nn.Module, quantization=None) -> tuple[dict, dict]:
    """Trace prefill.onnx (two seeded rows of different lengths, so no shape is specialised), stamp its dims,
    quantize it as decoder.onnx was (`quantization`, or None for a float graph), share its weights with
    decoder.onnx. `entries`: export_llm's manifest entries so far. Returns its graph record and what it shares
    (llm.prefill_graph, llm.prefill_weights)."""
    hidden, vocab, rope = entries[Keys.LLM_HIDDEN_SIZE], entries[Keys.LLM_VOCAB_SIZE], entries[Keys.POSITIONS_ROPE]
    inputs, outputs = prefill_io(runner, hidden=hidden, vocab=vocab, kv_heads=entries[Keys.LLM_NUM_KV_HEADS],
                                 head_dim=entries[Keys.LLM_HEAD_DIM], rope=rope)
    sample = sample_prompt_batch(runner, hidden, vocab, embed, rope)
    path = Path(out_dir) / Files.PREFILL
    from edgeprune.export.staged_decoder import dynamic_axes

    log.info("exporting %s (%s)", Files.PREFILL, runner.extra_repr())
    export_onnx(PrefillGraph(decoder, runner).eval(), sample, path, input_names=list(inputs),
                output_names=list(outputs), dynamic_axes=dynamic_axes({**inputs, **outputs}), external_data=True)
    _stamp_io_dims(path, {**inputs, **outputs})
    if quantization is not None:
        quantize_decoder(out_dir, Files.PREFILL, quantization)
    weights = share_weights(path, Path(out_dir) / entries[Keys.LLM_DECODER_GRAPH][Graph.FILE])
    return {Graph.FILE: Files.PREFILL, **graph_io(path)}, weights


def _tensor_key(tensor: onnx.TensorProto, raw: bytes) -> tuple:
    return tensor.data_type, tuple(tensor.dims), hashlib.sha256(raw).hexdigest()


def share_weights(prefill: Path, decoder: Path) -> dict:
    """Point prefill.onnx's initializers at the identical bytes of `decoder`'s external data file, under the
    decoder's names (so a runtime can hand both sessions one copy: runtime/llm.py `share_weights`), and delete
    prefill.onnx.data. Tensors with no twin stay inline (small constants). Returns byte counts."""
    dec = onnx.load(str(decoder), load_external_data=False)
    data_name = external_data(decoder.name)
    index = {}
    with open(decoder.with_name(data_name), "rb") as f:
        for t in dec.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = external_data_helper.ExternalDataInfo(t)
            f.seek(info.offset)
            index.setdefault(_tensor_key(t, f.read(info.length)), (t.name, info.offset, info.length))
    model = onnx.load(str(prefill), load_external_data=True)
    graph = model.graph
    hits = {}   # prefill name -> (decoder name, offset, length) for tensors with a twin
    for t in graph.initializer:
        raw = t.raw_data if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).tobytes()
        hit = index.get(_tensor_key(t, raw))
        if hit is not None:
            hits[t.name] = hit
    taken = {hit[0] for hit in hits.values()}
    rename, initializers, shared, inline, tensors = {}, {}, 0, 0, []
    for t in graph.initializer:
        if t.name not in hits:   # stays inline; a name a shared tensor now uses gets a fresh one
            rename[t.name] = f"{t.name}.prefill" if t.name in taken else t.name
            t.name = rename[t.name]
            initializers[t.name] = t
            inline += len(t.raw_data) if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).nbytes
            continue
        name, offset, length = hits[t.name]
        rename[t.name] = name
        if name in initializers:   # identical bytes under another prefill name (equal norm weights): one tensor
            continue
        t.name = name
        external_data_helper.set_external_data(t, location=data_name, offset=offset, length=length)
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        initializers[name] = t
        shared += length
        tensors.append([name, onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name, list(t.dims), offset])
    del graph.initializer[:]
    graph.initializer.extend(initializers.values())
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    tmp = prefill.with_name(prefill.name + ".tmp")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, prefill)
    own = prefill.with_name(external_data(prefill.name))
    if own.exists():
        own.unlink()
    if inline > 1 << 20:
        log.warning("prefill.onnx: %.1f MiB of weights have no twin in %s (stored inline)", inline / 2**20, data_name)
    # the tensors both graphs read, for a runtime that loads them once: [name, numpy dtype, shape, offset]
    return {"file": data_name, "shared_bytes": shared, "inline_bytes": inline, "tensors": tensors}


def sample_prompt_batch(runner: StageRunner, hidden: int, vocab: int, embed: nn.Module, rope: str, seed: int = 0):
    """Two seeded rows [prefix S | K image slots | text], the second with 3 fewer text tokens (right padding):
    (embeds [2, L, D], position_ids, attention_mask [2, L], image_positions [2, K]). Image slots are random
    embeddings at original positions with a gap; every row has enough text for the method."""
    g = torch.Generator().manual_seed(seed)
    s, k = runner.image_start, runner.num_image
    m = max(6, runner.method.min_text_tokens + 4)
    ids = torch.randint(0, vocab, (2, s + k + m), generator=g)
    embeds = embed(ids).detach()
    embeds[:, s:s + k] = torch.randn(2, k, hidden, generator=g).to(embeds.dtype) * embeds.std()
    mask = torch.ones(2, s + k + m, dtype=torch.int64)
    mask[1, -3:] = 0
    grid = runner.grid or (1, k + 2)
    n = grid[0] * grid[1]
    image_positions = torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(2)])   # [2, K]
    text_lens = (mask[:, s + k:].sum(dim=1)).tolist()
    pos = build_positions_rows(rope, s, image_positions.numpy(), [n, n], [grid] * 2, text_lens, "original")
    return embeds, torch.from_numpy(pos), mask, image_positions


@torch.no_grad()
def validate_prefill(llm: nn.Module, runner: StageRunner, bundle_dir: Path, entries: dict, *, steps: int = 3) -> dict:
    """ORT (prefill.onnx, then decoder.onnx) vs the torch reference loop (inllm/loop.py) on seeded rows of
    different lengths. Float graphs: kept slots identical, max |logit diff| within TOLERANCE. Quantized ones
    (int8/int4) select on scores their own weights perturb, so a near-tie may keep another slot: each stage's
    keep_overlap (kept slots shared with the float32 reference, averaged over rows) must reach
    MIN_AGREEMENT[precision] and the logits' relative RMS error (validate_llm's metric) TOLERANCE. Returns the
    errors."""
    from edgeprune.inllm.loop import StagedLM
    from edgeprune.runtime.llm import OrtLLM
    from edgeprune.runtime.positions import next_positions

    embeds, pos, mask, image_positions = sample_prompt_batch(runner, entries[Keys.LLM_HIDDEN_SIZE],
                                                             entries[Keys.LLM_VOCAB_SIZE], llm.get_input_embeddings(),
                                                             entries[Keys.POSITIONS_ROPE])
    precision = entries[Keys.LLM_PRECISION]
    quantized = precision in PRESETS
    torch_lm = StagedLM(llm, runner)
    ref = torch_lm.prefill(embeds, pos, mask, image_positions)
    plan = runner.plan()
    ort_llm = OrtLLM(bundle_dir, entries, providers=resolve_providers(["cpu"]), stages=plan)
    logits, present, keeps = ort_llm.prefill(embeds.numpy(), pos.numpy(), mask.numpy(), image_positions.numpy())
    # per stage, the rows whose kept slots differ (none expected in float graphs) and the worst row's logit error
    rows = {s: np.flatnonzero((a != b.numpy()).any(axis=1)).tolist()
            for s, (a, b) in enumerate(zip(keeps, torch_lm.keeps))}
    mismatch = [s for s, r in rows.items() if r]
    overlap = [float(np.mean([np.isin(a_row, b_row).mean() for a_row, b_row in zip(a, b.numpy())]))
               for a, b in zip(keeps, torch_lm.keeps)]
    diff = np.abs(logits - ref.numpy()).max(axis=1)                                   # [B]
    errors = {"prefill": float(diff.max()), "prefill_worst_row": int(diff.argmax()), "keep_mismatch_stages": mismatch,
              "keep_mismatch_rows": {str(s): r for s, r in rows.items() if r}, "keep_overlap": overlap,
              "prefill_relative": _logit_errors(logits, ref)[1]}
    masks = plan.group_masks(mask.numpy())
    decode, relative = [0.0], [0.0]
    for t in range(steps):
        nxt = torch.from_numpy(ref.numpy().argmax(-1))                              # same token on both sides
        step_embeds = llm.get_input_embeddings()(nxt[:, None])
        step_pos = next_positions(pos.numpy(), t)
        ref = torch_lm.step(step_embeds, torch.from_numpy(step_pos))
        masks = [np.concatenate([m, np.ones((m.shape[0], 1), m.dtype)], axis=1) for m in masks]
        logits, present = ort_llm.step(step_embeds.numpy(), step_pos, masks, present)
        decode.append(float(np.abs(logits - ref.numpy()).max()))
        relative.append(_logit_errors(logits, ref)[1])
    errors["decode"], errors["decode_relative"] = max(decode), max(relative)
    errors["tolerance"] = TOLERANCE[precision]
    if quantized:
        errors.update(metric="relative_rms", min_overlap=MIN_AGREEMENT[precision])
        errors[PASSED] = min(overlap, default=1.0) >= errors["min_overlap"] and \
            max(errors["prefill_relative"], errors["decode_relative"]) <= errors["tolerance"]
    else:
        errors["metric"] = "max_abs"
        errors[PASSED] = not mismatch and max(errors["prefill"], errors["decode"]) <= errors["tolerance"]
    (log.info if errors[PASSED] else log.warning)("in-LLM prefill parity ORT vs torch: %s", errors)
    return errors
