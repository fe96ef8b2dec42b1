"""Run the exported LLM (decoder.onnx + its embedding table, see export/llm.py) with ONNX Runtime. numpy +
onnxruntime only.

Prefill on the whole prompt, then one decoder call per new token. A DeepStack decoder (Qwen3-VL,
llm.deepstack_layers > 0) gets the image tokens' DeepStack features in the prefill and zeros in decode steps.
Decode token t (0-based) gets position id position_ids[:, -1] + 1 + t per row (runtime.positions.next_positions;
M-RoPE decoders take [3, B, L] ids and get the row's largest id + 1 + t). Rows of equal length get an all-ones
attention mask. Rows of different lengths (`lengths`, the server's batches of different prompts) are right-padded,
the only padding the fused graph supports; since the decoder returns the last position's logits only, each row's
last prompt token is then fed in a second call, as a decode step over the padded cache (`_prefill_padded`).

The KV cache (`KVCache`) is what the manifest's llm.kv_cache says:
- "shared" (the fused decoder, GroupQueryAttention): ONE preallocated buffer whose per-layer slices are bound with
  IO binding as both past and present (the op writes the new tokens in place at the row's length, read from
  `attention_mask`'s row sums). Nothing is copied between steps; only the new token's embedding, position and
  mask go in, and the logits come out into a preallocated array.
- "separate": past fed and present returned as numpy arrays (plain graphs concatenate; older fused bundles).
Token embeddings are numpy rows of the stored table (`EmbeddingTable`, no second ORT session per token); bundles
written before llm.embed_table run their embed.onnx.

Bundles with an in-LLM stage (runtime/stages.py) prefill with prefill.onnx, which prunes inside the LLM, takes the
right-padded rows with their attention mask (it returns each row's last real token's logits) and returns the kept
image slots of each stage; decode then runs decoder.onnx ("separate" cache: the in-LLM export's decoder,
export/staged_decoder.py, has the fused layers but numpy past/present) with one attention mask per KV group (the
cache lengths of the stage's KV policy), each grown by one token per step.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from edgeprune.errors import BundleError, EdgepruneError
from edgeprune.runtime.bundle import check_llm_graphs
from edgeprune.runtime.checks import check_context, check_count
from edgeprune.runtime.embedding import EmbeddingTable
from edgeprune.runtime.format import (DECODER_DEEPSTACK, DECODER_EMBEDS, DECODER_LOGITS, DECODER_MASK,
                                      DECODER_POSITIONS, EMBED_INPUT, EMBED_OUTPUT, PREFILL_IMAGE_POSITIONS, EmbedTable,
                                      Files, Graph, Keys, Quantization, external_data, group_mask_name, llm_precision,
                                      optional_keys, past_names, present_names, stage_keep_name)
from edgeprune.runtime.positions import next_positions
from edgeprune.runtime.providers import PROVIDERS, open_session, provider_names, resolve_providers, session_options
from edgeprune.runtime.sampling import check_sampling, make_rng, next_tokens

__all__ = ["OrtLLM", "Generation", "KVCache", "check_gpu_precision", "warn_cpu_fallback", "llm_files", "llm_manifest",
           "LLM_ENTRIES", "describe_precision"]

log = logging.getLogger(__name__)

NP_DTYPES = {"float32": np.float32, "float16": np.float16}
LLM_ENTRIES = "llm.json"   # export_llm's entries beside an LLM exported on its own (not a bundle)
ORT_DEVICES = {"CUDAExecutionProvider": "cuda"}   # where a shared KV buffer lives when the decoder runs there


@dataclass
class Generation:
    ids: np.ndarray                                   # [B, T] int64, T <= max_new_tokens
    prefill_s: float
    decode_s: list[float] = field(default_factory=list)  # one entry per decoder call after the prefill
    kv_bytes: int = 0                                 # bytes of the KV cache's filled part at the end
    num_prompt_tokens: int = 0
    stage_keep: list[np.ndarray] = field(default_factory=list)  # per in-LLM stage: [B, K_s] kept image slots


# ONNX Runtime registers its CUDA GroupQueryAttention kernel for float16 and bfloat16 only (T in
# contrib_ops/cuda/bert/group_query_attention.cc: MLFloat16, BFloat16; no float). A float32 fused graph on the
# CUDA (or TensorRT) provider would run its attention nodes on the CPU, copying the KV cache every layer.
GPU_FUSED_DTYPES = ("float16",)


def check_gpu_precision(providers: list, attention: str, dtype: str) -> None:
    """EdgepruneError when the resolved `providers` put the LLM on a GPU whose fused attention kernel does not
    exist in the graph's dtype, naming the export that fits."""
    gpu = [p for p in provider_names(providers) if p != PROVIDERS["cpu"]]
    if gpu and attention == "fused" and dtype not in GPU_FUSED_DTYPES:
        raise EdgepruneError(f"LLM graphs are {dtype} with fused attention (com.microsoft GroupQueryAttention), which "
                             f"ONNX Runtime's CUDA provider runs in float16/bfloat16 only: on {', '.join(gpu)} the "
                             "attention would fall back to the CPU. Export for the GPU with `edgeprune export ... "
                             "--llm-precision fp16` (int8/int4 graphs keep float32 activations: a CPU choice; or "
                             "`--attention plain` to keep float32), or run with --provider cpu")


def llm_files(manifest: dict) -> list[str]:
    """The bundle files of the LLM: the decoder, its external data and the embedding table (or, in bundles
    written before the table, the embed graph and its data), relative to the bundle folder."""
    graphs = [manifest[Keys.LLM_DECODER_GRAPH][Graph.FILE]]
    if manifest[Keys.LLM_EMBED_GRAPH] is not None:
        graphs.append(manifest[Keys.LLM_EMBED_GRAPH][Graph.FILE])
    files = [f for graph in graphs for f in (graph, external_data(graph))]
    if manifest[Keys.LLM_PREFILL_GRAPH] is not None:   # an in-LLM stage's prefill: its weights are the decoder's data
        files.append(manifest[Keys.LLM_PREFILL_GRAPH][Graph.FILE])
    if manifest[Keys.LLM_EMBED_TABLE] is not None:
        files.append(manifest[Keys.LLM_EMBED_TABLE][EmbedTable.FILE])
    return list(dict.fromkeys(files))


def llm_manifest(folder: str | Path) -> dict:
    """The LLM entries of a bundle (its manifest, verified) or of a folder export_llm wrote with its entries saved
    as LLM_ENTRIES (benchmarks and experiments), with format.read's defaults filled in."""
    folder = Path(folder)
    if (folder / Files.MANIFEST).is_file():
        from edgeprune.runtime.bundle import load_bundle

        return load_bundle(folder).manifest
    path = folder / LLM_ENTRIES
    if not path.is_file():
        raise BundleError(f"{folder}: neither a bundle ({Files.MANIFEST}) nor an exported LLM ({LLM_ENTRIES})")
    entries = json.loads(path.read_text())
    return {**{key: key.default for key in optional_keys()}, **entries}


def describe_precision(manifest: dict) -> str:
    """One line for `inspect`, the export summary and logs, e.g. "int4: MatMulNBits 4-bit, block 32, asymmetric,
    minmax (block minima in 2 digits), accuracy level 4, LM head 8-bit (4-bit draft, its top 64 rescored)" (a tied
    embedding table is the LM head's weight: quantized with it)."""
    q = manifest[Keys.LLM_QUANTIZATION]
    if not q:
        return llm_precision(manifest)
    bits = q[Quantization.BITS]
    head = f"LM head {q.get(Quantization.LM_HEAD_BITS) or bits}-bit" if q.get(Quantization.LM_HEAD) else \
        "LM head float"
    if q.get(Quantization.LM_HEAD_SHORTLIST):
        head += f" (4-bit draft, its top {q[Quantization.LM_HEAD_SHORTLIST]} rescored)"
    algorithm = q.get(Quantization.ALGORITHM)
    if algorithm == "minmax":
        algorithm = f"minmax (block minima in {q.get(Quantization.MIN_DIGITS)} digits)"
    return (f"{llm_precision(manifest)}: MatMulNBits {bits}-bit, block {q[Quantization.BLOCK_SIZE]}, "
            f"{'symmetric' if q.get(Quantization.SYMMETRIC) else 'asymmetric'}, {algorithm}, "
            f"accuracy level {q.get(Quantization.ACCURACY_LEVEL)}, {head}")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


def warn_cpu_fallback(providers: list, session_providers: list) -> None:
    """A warning when a GPU provider was resolved but the session runs on the CPU only (e.g. onnxruntime-gpu
    without the CUDA libraries it needs: ONNX Runtime then falls back to the CPU by itself)."""
    gpu = [p for p in provider_names(providers) if p != PROVIDERS["cpu"]]
    if gpu and list(session_providers) == [PROVIDERS["cpu"]]:
        log.warning("the LLM was to run on %s but ONNX Runtime put it on the CPU (check the CUDA libraries "
                    "onnxruntime-gpu needs)", ", ".join(gpu))


class OrtLLM:
    """decoder.onnx and the embedding table from `bundle_dir`, described by `manifest` (the bundle's, or export_llm's
    entries read through format.read's defaults)."""

    def __init__(self, bundle_dir: Path, manifest: dict, providers: list | None = None, threads: int | None = None,
                 stages=None, share_weights: bool = False, spin: bool = True):
        """`providers`: resolve_providers' list (the pipeline resolves once for every graph); short names are
        resolved here. CPU is always the fallback. `stages`: the bundle's in-LLM StagePlan (runtime/stages.py),
        required exactly when the manifest has a prefill graph. `share_weights` (CPU, in-LLM bundles): prefill
        and decoder sessions read one copy of the weights instead of one each, at the cost of ORT's weight
        prepacking (measured on SmolLM2-135M: 546 instead of 1058 MiB, prefill about 14 % and decode about 6 %
        slower). `spin`: False lets the pools' threads sleep between calls (runtime/providers.session_options)."""
        bundle_dir = Path(bundle_dir)
        try:
            self.num_layers, self.kv_heads = manifest[Keys.LLM_NUM_LAYERS], manifest[Keys.LLM_NUM_KV_HEADS]
            self.head_dim, self.hidden_size = manifest[Keys.LLM_HEAD_DIM], manifest[Keys.LLM_HIDDEN_SIZE]
            self.dtype_name, self.attention = manifest[Keys.LLM_DTYPE], manifest[Keys.LLM_ATTENTION]
            self.dtype = NP_DTYPES[self.dtype_name]
            self.rope = manifest[Keys.POSITIONS_ROPE]   # "mrope": position_ids [3, B, L] (export/llm.py)
            self.deepstack_layers = manifest[Keys.LLM_DEEPSTACK_LAYERS]   # 0: no DeepStack input
            self.context_length = manifest[Keys.LLM_CONTEXT_LENGTH]   # None: a schema-1 bundle never recorded it
            self.kv_cache, self.vocab_size = manifest[Keys.LLM_KV_CACHE], manifest[Keys.LLM_VOCAB_SIZE]
            decoder = bundle_dir / manifest[Keys.LLM_DECODER_GRAPH][Graph.FILE]
            table, embed_graph = manifest[Keys.LLM_EMBED_TABLE], manifest[Keys.LLM_EMBED_GRAPH]
            needed = manifest[Keys.LLM_MIN_ONNXRUNTIME]
            prefill = manifest[Keys.LLM_PREFILL_GRAPH]
            quantization = manifest[Keys.LLM_QUANTIZATION] or {}
            self.mask_names = [group_mask_name(g) for g in range(len(manifest[Keys.LLM_KV_GROUPS]))]
        except KeyError as err:
            raise BundleError(f"LLM entries: missing or unsupported value {err}; expected export_llm's manifest "
                              "entries") from None
        if not decoder.is_file():
            raise BundleError(f"{decoder}: decoder graph not found")
        if table is None and embed_graph is None:
            raise BundleError(f"{decoder}: the manifest has neither {Keys.LLM_EMBED_TABLE} nor {Keys.LLM_EMBED_GRAPH}")
        if needed and _version(ort.__version__) < _version(needed):
            why = [reason for reason, used in (
                ("GroupQueryAttention with explicit position ids", self.attention == "fused"),
                ("GatherBlockQuantized over the LM head's 8-bit rows",
                 bool(quantization.get(Quantization.LM_HEAD_SHORTLIST)))) if used]
            raise BundleError(f"{decoder}: needs onnxruntime >= {needed} ({' and '.join(why) or 'its ops'}), this "
                              f"is {ort.__version__}; upgrade onnxruntime" +
                              (" or re-export with --attention plain" if self.attention == "fused" else ""))
        self.stages = stages
        if (prefill is not None) != (stages is not None):
            raise BundleError(f"{bundle_dir}: the manifest {'has' if prefill is not None else 'has no'} prefill graph "
                              f"but {'no' if stages is None else 'an'} in-LLM stage was given")
        if stages is not None and self.kv_cache != "separate":
            raise BundleError(f"{bundle_dir}: an in-LLM stage decodes with a separate KV cache, the manifest's "
                              f"{Keys.LLM_KV_CACHE} is {self.kv_cache!r}")
        self.providers = resolve_providers(providers)
        check_gpu_precision(self.providers, self.attention, self.dtype_name)
        opts = session_options(threads, spin)
        llm_opts = [opts, opts]
        if share_weights and stages is not None:
            llm_opts = [self._shared_weights(bundle_dir, manifest[Keys.LLM_PREFILL_WEIGHTS] or {},
                                             session_options(threads, spin))] * 2
        self.decoder = open_session(decoder, llm_opts[0], self.providers)
        self.prefill_session = None
        if prefill is not None:
            if not (bundle_dir / prefill[Graph.FILE]).is_file():
                raise BundleError(f"{bundle_dir / prefill[Graph.FILE]}: prefill graph not found")
            self.prefill_session = open_session(bundle_dir / prefill[Graph.FILE], llm_opts[1], self.providers)
        if table is not None:
            self._embed = EmbeddingTable(bundle_dir, table)
            embed_out = {EMBED_OUTPUT: ([None, None, self._embed.dim], self._embed.dtype.name)}
        else:                                                   # bundles written before llm.embed_table
            path = bundle_dir / embed_graph[Graph.FILE]
            if not path.is_file():
                raise BundleError(f"{path}: embed graph not found")
            session = open_session(path, opts, self.providers)
            self._embed = lambda ids: session.run(None, {EMBED_INPUT: ids})[0]
            embed_out = _signature(session.get_outputs())
        check_llm_graphs(manifest, embed_out, _signature(self.decoder.get_inputs()),
                         _signature(self.decoder.get_outputs()), decoder)
        if table is not None and self._embed.vocab != self.vocab_size:
            raise BundleError(f"{bundle_dir / table[EmbedTable.FILE]}: the embedding table has {self._embed.vocab} "
                              f"rows, the manifest's {Keys.LLM_VOCAB_SIZE} is {self.vocab_size}")
        self.device = self.decoder.get_providers()[0]
        self._kv_device = ORT_DEVICES.get(self.device, "cpu")
        warn_cpu_fallback(self.providers, self.decoder.get_providers())
        self.description = describe_precision(manifest)
        log.info("LLM on %s (threads=%s, attention=%s, %s, KV cache %s)", self.decoder.get_providers(), threads,
                 self.attention, self.description, self.kv_cache)
        self.past_names = past_names(self.num_layers)
        self.present_names = present_names(self.num_layers)
        self.output_names = [DECODER_LOGITS, *self.present_names]

    def _shared_weights(self, bundle_dir: Path, weights: dict, opts):
        """Session options handing ORT the tensors prefill.onnx and decoder.onnx share, read once into memory
        (export/inllm.py share_weights records them); ORT then keeps no copy of its own, so its per-session
        weight prepacking is off. CPU only: a GPU provider copies every initializer to its device anyway.
        `opts`: the session options to add them to."""
        if provider_names(self.providers) != [PROVIDERS["cpu"]] or not weights.get("tensors"):
            log.info("share_weights: not applied (providers %s)", provider_names(self.providers))
            return opts
        if not hasattr(self, "_weights"):
            data = np.fromfile(bundle_dir / weights["file"], dtype=np.uint8)
            try:
                self._weights = {name: ort.OrtValue.ortvalue_from_numpy(
                    np.frombuffer(data, dtype=np.dtype(dtype), count=int(np.prod(shape)), offset=offset).reshape(shape))
                    for name, dtype, shape, offset in weights["tensors"]}
            except (TypeError, ValueError) as err:
                raise BundleError(f"{bundle_dir / weights['file']}: the shared LLM weights do not match the "
                                  f"manifest's {Keys.LLM_PREFILL_WEIGHTS} ({err})") from None
            self._weights_data = data   # the OrtValues point into it: it must outlive the sessions
        opts.add_session_config_entry("session.disable_prepacking", "1")
        for name, value in self._weights.items():
            opts.add_initializer(name, value)
        return opts

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """ids [B, L] int64 -> inputs_embeds [B, L, D] in the graph's dtype."""
        return self._embed(np.asarray(ids, dtype=np.int64))

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty KV cache for `batch` rows of up to `capacity` tokens, of the kind the manifest names."""
        if self.kv_cache == "shared":
            return SharedKVCache(self, batch, capacity)
        return SeparateKVCache(self, batch)

    def forward(self, inputs_embeds: np.ndarray, position_ids: np.ndarray, cache: KVCache,
                attention_mask: np.ndarray | None = None, deepstack: np.ndarray | None = None) -> np.ndarray:
        """Run the decoder on the next L tokens of every row, appending them to `cache`; `attention_mask` [B, T]
        covers the cache and the new tokens (None: all ones); `deepstack` as in `step`. -> logits [B, V] of the last
        one (a copy: a shared cache reuses its output buffer)."""
        b, length = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = np.ones((b, cache.length + length), np.int64)
        return cache.run(self._feeds(inputs_embeds, position_ids, attention_mask, deepstack)).copy()

    def step(self, inputs_embeds: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
             past: list[np.ndarray] | None, deepstack: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """One stateless decoder call (numpy past in, present out; past None = prefill). `deepstack` [B, L, layers,
        D] for a DeepStack decoder (None: zeros). Returns (logits [B, V] float32, present [k0, v0, k1, ...]).
        `generate` uses `forward` with a KVCache instead."""
        if past is None:
            empty = np.zeros((inputs_embeds.shape[0], self.kv_heads, 0, self.head_dim), dtype=self.dtype)
            past = [empty] * len(self.past_names)
        feeds = {**self._feeds(inputs_embeds, position_ids, attention_mask, deepstack),
                 **dict(zip(self.past_names, past))}
        logits, *present = self.decoder.run(self.output_names, feeds)
        return logits, present

    def _feeds(self, inputs_embeds, position_ids, attention_mask, deepstack) -> dict:
        """`attention_mask`: [B, T] for every KV group, or a list with one per group (an in-LLM stage's decoder)."""
        masks = attention_mask if isinstance(attention_mask, list) else [attention_mask] * len(self.mask_names)
        feeds = {DECODER_EMBEDS: np.ascontiguousarray(inputs_embeds, dtype=self.dtype),
                 DECODER_POSITIONS: np.ascontiguousarray(position_ids, dtype=np.int64),
                 **{name: np.ascontiguousarray(m, dtype=np.int64) for name, m in zip(self.mask_names, masks)}}
        if self.deepstack_layers:
            if deepstack is None:
                b, length = inputs_embeds.shape[:2]
                deepstack = np.zeros((b, length, self.deepstack_layers, self.hidden_size), self.dtype)
            feeds[DECODER_DEEPSTACK] = np.ascontiguousarray(deepstack, dtype=self.dtype)
        return feeds

    def prefill(self, inputs_embeds: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                image_positions: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """The in-LLM stage's prefill graph -> (logits [B, V] of each row's last real token, present [k0, v0, ...],
        kept slots per stage)."""
        m = len(self.stages.stages)
        names = [DECODER_LOGITS, *(stage_keep_name(s) for s in range(m)), *self.present_names]
        feeds = {DECODER_EMBEDS: np.ascontiguousarray(inputs_embeds, dtype=self.dtype),
                 DECODER_POSITIONS: np.ascontiguousarray(position_ids, dtype=np.int64),
                 group_mask_name(0): np.ascontiguousarray(attention_mask, dtype=np.int64),
                 PREFILL_IMAGE_POSITIONS: np.ascontiguousarray(image_positions, dtype=np.int64)}
        logits, *rest = self.prefill_session.run(names, feeds)
        return logits, rest[m:], rest[:m]

    def generate(self, inputs_embeds: np.ndarray, position_ids: np.ndarray, *, max_new_tokens: int, eos_token_ids,
                 do_sample: bool = False, top_p: float = 1.0, temperature: float = 1.0, seed: int = 0,
                 on_token: Callable[[int, np.ndarray], None] | None = None,
                 lengths: np.ndarray | None = None, deepstack: np.ndarray | None = None,
                 image_positions: np.ndarray | None = None) -> Generation:
        """Prefill `inputs_embeds` [B, L, D] at `position_ids` [B, L] ([3, B, L] for an M-RoPE decoder), then
        decode until every row has emitted an EOS or `max_new_tokens` tokens exist. Finished rows keep emitting EOS.
        `lengths` [B]: row b's prompt is its first lengths[b] tokens (right padding, contents ignored); None: all L.
        `deepstack` [B, L, layers, D]: a DeepStack decoder's prefill features (None: zeros).
        `image_positions` [B, K]: the vision graph's positions, for a bundle with an in-LLM stage."""
        inputs_embeds, position_ids = np.asarray(inputs_embeds), np.asarray(position_ids, dtype=np.int64)
        expected = inputs_embeds.shape[:2] if self.rope == "1d" else (3, *inputs_embeds.shape[:2])
        if inputs_embeds.ndim != 3 or position_ids.shape != expected:
            layout = "[B, L]" if self.rope == "1d" else "[3, B, L]"
            raise EdgepruneError(f"inputs_embeds {inputs_embeds.shape} and position_ids {position_ids.shape}: "
                                 f"expected [B, L, D] and {layout} (rope {self.rope!r})")
        max_new_tokens = check_count("max_new_tokens", max_new_tokens)
        check_context(int(position_ids.max()) if position_ids.size else -1, max_new_tokens, self.context_length)
        eos = np.array(sorted({int(e) for e in np.atleast_1d(eos_token_ids)}) if eos_token_ids is not None else [],
                       dtype=np.int64)
        if do_sample:
            check_sampling(top_p, temperature)
        rng = make_rng(seed)
        b, length = inputs_embeds.shape[:2]
        lengths = _check_lengths(lengths, b, length)

        if (self.stages is None) != (image_positions is None):
            raise EdgepruneError("image_positions [B, K]: " + ("this bundle prunes inside the LLM, generate() needs "
                                 "them" if self.stages is not None else "given, but this bundle has no in-LLM stage"))

        cache = self.new_cache(b, length + max_new_tokens)
        start = time.perf_counter()
        keeps = []
        if self.stages is not None:   # right padding handled inside the graph; one mask per KV group after it
            mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
            logits, cache.present, keeps = self.prefill(inputs_embeds, position_ids, mask, image_positions)
            mask, last_ids = self.stages.group_masks(mask), _last_ids(position_ids, lengths)
            cache.length = mask[0].shape[1]
        elif (lengths == length).all():
            mask = np.ones((b, length), np.int64)
            logits = self.forward(inputs_embeds, position_ids, cache, mask, deepstack)
            last_ids = position_ids                                          # next_positions continues from these
        else:
            logits, mask, last_ids = self._prefill_padded(inputs_embeds, position_ids, lengths, cache, deepstack)
        prefill_s = time.perf_counter() - start
        tokens, decode_s = [], []
        done = np.zeros(b, dtype=bool)
        finished_with = np.zeros(b, dtype=np.int64)                          # the EOS each finished row emitted
        for t in range(max_new_tokens):
            nxt = next_tokens(logits, do_sample, rng, top_p=top_p, temperature=temperature)  # [B]
            if len(eos):
                nxt = np.where(done, finished_with, nxt)                     # finished rows keep their EOS
                finished_with = np.where(done, finished_with, nxt)
                done |= np.isin(nxt, eos)
            tokens.append(nxt)
            if on_token is not None:
                on_token(t, nxt)
            if done.all() or t == max_new_tokens - 1:
                break
            start = time.perf_counter()
            mask = _grow(mask)
            logits = self.forward(self.embed(nxt[:, None]), next_positions(last_ids, t), cache, mask)
            decode_s.append(time.perf_counter() - start)
        return Generation(ids=np.stack(tokens, axis=1), prefill_s=prefill_s, decode_s=decode_s,
                          kv_bytes=cache.filled_bytes, num_prompt_tokens=length,
                          stage_keep=[np.asarray(k) for k in keeps])

    def _prefill_padded(self, inputs_embeds, position_ids, lengths, cache, deepstack=None):
        """Prefill rows of different lengths (right-padded to L): every token but each row's last in one call,
        then the last tokens as one decode step, whose logits are the ones generation needs.
        Returns (logits, attention mask so far, per-row ids for next_positions)."""
        b, length = inputs_embeds.shape[:2]
        rows, last = np.arange(b), lengths - 1
        mask = (np.arange(length - 1)[None, :] < last[:, None]).astype(np.int64)        # [B, L-1]
        head = None if deepstack is None else deepstack[:, :-1]
        self.forward(inputs_embeds[:, :-1], position_ids[..., :-1], cache, mask, head)
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
        last_pos = position_ids[..., rows, last][..., None]                            # [B, 1] or [3, B, 1]
        tail = None if deepstack is None else deepstack[rows, last][:, None]          # [B, 1, layers, D]
        logits = self.forward(inputs_embeds[rows, last][:, None], last_pos, cache, mask, tail)
        return logits, mask, _last_ids(position_ids, lengths)


def _last_ids(position_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per row, the ids next_positions continues from over its real (unpadded) tokens: the last token's id
    [B, 1]; M-RoPE: the row's largest id on every axis [3, B, 1]."""
    b, length = position_ids.shape[-2:]
    if position_ids.ndim == 3:
        real = np.arange(length)[None, :] < lengths[:, None]                          # [B, L]
        top = np.where(real[None], position_ids, np.iinfo(np.int64).min).max(axis=(0, 2))
        return np.broadcast_to(top[None, :, None], (3, b, 1))
    return position_ids[np.arange(b), lengths - 1][:, None]


def _grow(mask):
    """One more valid token in the mask (or in each KV group's mask)."""
    if isinstance(mask, list):
        return [_grow(m) for m in mask]
    return np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)


def _check_lengths(lengths, batch: int, length: int) -> np.ndarray:
    if lengths is None:
        return np.full(batch, length, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    shortest = 2 if lengths.shape == (batch,) and lengths.min() < length else 1  # a padded row needs one token + its last
    if lengths.shape != (batch,) or lengths.max() != length or lengths.min() < shortest:
        raise EdgepruneError(f"lengths {lengths.tolist()}: expected {batch} prompt lengths, the longest = the padded "
                             f"length {length}, each >= 2 when rows differ")
    return lengths

class KVCache:
    """The KV cache of one generation: `length` = the attention mask's width so far; `run` makes one decoder call
    that appends the call's tokens."""

    def __init__(self, llm: OrtLLM, batch: int):
        self.llm, self.batch, self.length = llm, batch, 0
        self._token_bytes = llm.num_layers * 2 * llm.kv_heads * llm.head_dim * np.dtype(llm.dtype).itemsize * batch

    @property
    def filled_bytes(self) -> int:
        return self.length * self._token_bytes

    def run(self, feeds: dict) -> np.ndarray:
        raise NotImplementedError


class SeparateKVCache(KVCache):
    """Past fed and present returned as numpy arrays (llm.kv_cache "separate")."""

    def __init__(self, llm: OrtLLM, batch: int):
        super().__init__(llm, batch)
        self.present = None

    @property
    def filled_bytes(self) -> int:   # what the arrays hold (an in-LLM stage's KV groups differ in length)
        return int(sum(p.nbytes for p in self.present)) if self.present is not None else 0

    def run(self, feeds: dict) -> np.ndarray:
        llm = self.llm
        if self.present is None:
            empty = np.zeros((self.batch, llm.kv_heads, 0, llm.head_dim), dtype=llm.dtype)
            self.present = [empty] * len(llm.past_names)
        logits, *self.present = llm.decoder.run(llm.output_names, {**feeds, **dict(zip(llm.past_names, self.present))})
        self.length = feeds[DECODER_MASK].shape[1]
        return logits


class SharedKVCache(KVCache):
    """One preallocated buffer bound as past AND present of every layer (GroupQueryAttention writes in place)."""

    def __init__(self, llm: OrtLLM, batch: int, capacity: int):
        super().__init__(llm, batch)
        self.capacity = capacity
        shape = (batch, llm.kv_heads, capacity, llm.head_dim)
        n = len(llm.past_names)
        if llm._kv_device == "cpu":   # one allocation; OrtValues are views of its per-layer slices
            self.buffer = np.zeros((n, *shape), dtype=llm.dtype)
            self.values = [ort.OrtValue.ortvalue_from_numpy(self.buffer[i]) for i in range(n)]
        else:
            self.buffer = None
            self.values = [ort.OrtValue.ortvalue_from_shape_and_type(shape, llm.dtype, llm._kv_device, 0)
                           for _ in range(n)]
        self.logits = np.zeros((batch, llm.vocab_size), np.float32)
        self.binding = llm.decoder.io_binding()
        for past, present, value in zip(llm.past_names, llm.present_names, self.values):
            self.binding.bind_ortvalue_input(past, value)
            self.binding.bind_ortvalue_output(present, value)
        self.binding.bind_ortvalue_output(DECODER_LOGITS, ort.OrtValue.ortvalue_from_numpy(self.logits))

    def run(self, feeds: dict) -> np.ndarray:
        total = feeds[DECODER_MASK].shape[1]
        if total > self.capacity:
            raise EdgepruneError(f"KV cache full: {total} tokens > capacity {self.capacity}")
        for name, value in feeds.items():
            self.binding.bind_cpu_input(name, value)
        self.llm.decoder.run_with_iobinding(self.binding)
        self.length = total
        return self.logits


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(bfloat16)": "bfloat16"}


def _signature(args) -> dict[str, tuple]:
    """onnxruntime NodeArgs -> {name: (shape, dtype name)} for bundle.check_llm_graphs."""
    return {a.name: (list(a.shape), _ORT_TYPES.get(a.type, a.type)) for a in args}
