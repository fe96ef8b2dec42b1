"""The bundle format, named once: file names, manifest keys, graph input/output names, the schema
version with its reader range, the migration of older manifests, and the manifest writer.

Every side imports this module (the standard library and edgeprune.errors only): export/ writes a bundle
with it; runtime/, profiles/, the CLI and `build-engine` read one (the gguf split: `gguf/constants.py`
for writer and reader). No torch, no numpy, no onnx.

A bundle is a folder:

    manifest.json        flat JSON object; its keys are the dotted `Keys` below
    vision.onnx          pixels -> image_tokens [B,K,D], positions [B,K] (+ pruner extras)
    vision_<h>x<w>.onnx  the same for each further resolution bucket (optional, vision.buckets)
    decoder.onnx         one graph for prefill and decode  (+ decoder.onnx.data)
    embed.bin            the token embedding table of an LLM whose LM head is not tied to it (a tied table is
                         stored once, inside decoder.onnx.data; llm.embed_table says where)
    embed.onnx           input_ids -> inputs_embeds: bundles written before llm.embed_table existed
    prefill.onnx         with an in-LLM stage only: the prefill with the stage inside (its weights are
                         references into decoder.onnx.data: one copy on disk); decoder.onnx then decodes
    llm_stage/<opt>.npy  array-valued options of the in-LLM stage (llm_stage.config refers to them)
    tokenizer.json       tokenizers.Tokenizer
    preprocess.json      runtime.preprocess.PreprocessConfig
    pruner/<option>.npy  array-valued pruner options (pruner.config refers to them)
    engines/             TensorRT engines, timing and int8 caches (edgeprune build-engine, optional)

Every file except manifest.json is listed with its sha256 under `files.sha256`; the runtime refuses a
bundle whose listed files are missing or differ. ONNX Runtime's own TensorRT cache
(engines/ort-tensorrt/) is written at run time and never listed.

Schema versions (`general.schema_version`; this reader reads MIN_SCHEMA_VERSION..SCHEMA_VERSION):
  1  first release: the LLM's facts nested in one `llm.spec` dict, `positions.rope` absent on 1-D
     bundles, the LLM validation flag called `ok`, engines under `engines` without device facts.
  2  this development release: flat `llm.*` and `vision.*` model facts (the planner's too), a
     format marker `general.format`, `validation.vision` / `validation.llm` with one flag `passed`,
     engines under `engines.<name>` with TensorRT version, GPU and batch profile.
`read` migrates a v1 manifest to the v2 layout in one place (`_migrate_v1`); facts a v1 bundle never
recorded become None (UNKNOWN), and readers that need one call `known(manifest, key)`, which names
the key and says to re-export.

Adding a key (rule for this development release: schema 2 stays 2 until the release ships, later
issues add keys to it without a bump). It is ONE line here, plus the code that writes and reads it:

    VISION_EXAMPLE = Key("vision.example", TEXT, default="none")   # what it records

- The Kind (TEXT, COUNT, GRAPH, ... below) is what JSON value the key holds; `read` checks every key's
  value against it, nested records included, and a mismatch is a BundleError naming the key and what
  was expected, so readers never meet a string where a number belongs.
- `Key("x.y", KIND)` is required: `read` refuses a manifest without it, so write it in every export.
  `Key("x.y", KIND, default=v)` is optional: `read` fills `v` when it is absent (older schema-2 bundles of
  this release, or a fact only some exports have). Prefer optional with a default that means "as
  before", so bundles exported earlier in the release keep loading. export_bundle writes every
  optional key (its value, or the default), so a fresh manifest lists every key.
- Readers index the manifest with the constant (`manifest[Keys.X]`), never with a literal string and
  never with `.get` (`read` has filled every default). tests/runtime/test_format.py walks the keys
  readers use against a freshly exported manifest and rejects literal key strings outside this file.
- Nested records (graphs, engines, buckets, validation) name their fields in the classes below.
Bump SCHEMA_VERSION only for a change a reader of the released schema would misread, and migrate the
previous version in `read`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from edgeprune.errors import BundleError

__all__ = ["SCHEMA_VERSION", "MIN_SCHEMA_VERSION", "FORMAT", "UNKNOWN", "Key", "Keys", "Files", "Graph", "Engine",
           "Bucket", "EmbedTable", "ScorerRecord", "Quantization", "PRECISIONS", "KV_CACHES", "llm_precision", "PASSED", "read", "recognise", "write_manifest", "known", "required_keys", "optional_keys",
           "llm_keys", "bucket_file", "Kind",
           "external_data", "VISION_INPUT", "VISION_TOKENS", "VISION_POSITIONS", "EMBED_INPUT", "EMBED_OUTPUT",
           "DECODER_EMBEDS", "DECODER_POSITIONS", "DECODER_MASK", "DECODER_LOGITS", "KV_KINDS", "past_name",
           "present_name", "past_names", "present_names", "DIM_BATCH", "DIM_SEQUENCE", "DIM_PAST", "DIM_TOTAL",
           "VISION_DEEPSTACK", "DECODER_DEEPSTACK", "PREFILL_IMAGE_POSITIONS", "stage_keep_name", "group_mask_name",
           "Stage"]

SCHEMA_VERSION = 2
MIN_SCHEMA_VERSION = 1
FORMAT = "edgeprune.bundle"   # general.format: what this folder is (schema 1 bundles lack it)
UNKNOWN = None                # the value of a fact a migrated older bundle never recorded

# ---- graph input/output names -------------------------------------------------------------------
# vision graph: pixels [B, 3, H, W] -> image_tokens [B, K, D_llm], positions [B, K] int64, *pruner extras
VISION_INPUT = "pixels"
VISION_TOKENS = "image_tokens"
VISION_POSITIONS = "positions"
# embed graph: input_ids [B, L] int64 -> inputs_embeds [B, L, D]
EMBED_INPUT = "input_ids"
EMBED_OUTPUT = "inputs_embeds"
# decoder graph: inputs_embeds [B, L, D], position_ids [B, L] ([3, B, L] M-RoPE), attention_mask [B, T],
# past_key_values.<i>.key/.value [B, KV, P, hd] -> logits [B, V], present.<i>.key/.value [B, KV, T, hd]
DECODER_EMBEDS = "inputs_embeds"
DECODER_POSITIONS = "position_ids"
DECODER_MASK = "attention_mask"
DECODER_LOGITS = "logits"
KV_KINDS = ("key", "value")
# symbolic (dynamic) dimension names of the graphs
DIM_BATCH = "batch"
DIM_SEQUENCE = "sequence"
DIM_PAST = "past_sequence"
DIM_TOTAL = "total_sequence"
# DeepStack (Qwen3-VL): the vision graph's features of the K kept tokens for the first L decoder layers
# [B, K, L, D], and the decoder input they become [B, sequence, L, D] (zeros at text positions and in decode
# steps); present when llm.deepstack_layers > 0
VISION_DEEPSTACK = "deepstack_tokens"
DECODER_DEEPSTACK = "deepstack_embeds"
# prefill graph of an in-LLM stage (export/inllm.py writes, runtime/llm.py reads): the decoder's inputs (one
# attention mask) + image_positions [B, K] -> logits, image_keep.<s> [B, K_s] per stage, present.*
PREFILL_IMAGE_POSITIONS = "image_positions"     # the vision graph's positions


def stage_keep_name(stage: int) -> str:
    """Prefill output [B, K_s]: image slots (0..K-1, ascending) kept by stage `stage` (0-based)."""
    return f"image_keep.{stage}"


def group_mask_name(group: int) -> str:
    """Decoder input: the attention mask of KV group `group` (0: every layer before the first stage; groups > 0
    exist under the "faithful" KV policy only, with their own past/total lengths `<dim>.<group>`)."""
    return DECODER_MASK if group == 0 else f"{DECODER_MASK}.{group}"


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


def past_names(num_layers: int) -> list[str]:
    """Decoder KV inputs in graph order: layer 0 key, layer 0 value, layer 1 key, ..."""
    return [past_name(i, kind) for i in range(num_layers) for kind in KV_KINDS]


def present_names(num_layers: int) -> list[str]:
    return [present_name(i, kind) for i in range(num_layers) for kind in KV_KINDS]


# ---- files --------------------------------------------------------------------------------------
class Files:
    MANIFEST = "manifest.json"
    VISION = "vision.onnx"
    EMBED = "embed.onnx"                     # older bundles only (now: llm.embed_table)
    EMBED_TABLE = "embed.bin"                # an untied embedding table (a tied one lives in decoder.onnx.data)
    DECODER = "decoder.onnx"
    PREFILL = "prefill.onnx"                 # in-LLM stage only
    STAGE_ARRAYS = "llm_stage"               # folder of array-valued in-LLM stage options (<option>.npy)
    TOKENIZER = "tokenizer.json"
    PREPROCESS = "preprocess.json"
    PRUNER_ARRAYS = "pruner"                 # folder of array-valued pruner options (<option>.npy)
    ENGINES = "engines"                      # folder written by build-engine
    VISION_ENGINE = "engines/vision.plan"
    TIMING_CACHE = "engines/timing.cache"
    INT8_CACHE = "engines/int8.cache"
    ORT_TRT_CACHE = "engines/ort-tensorrt"   # ONNX Runtime's TensorRT provider cache: run-time, never hashed


def bucket_file(size) -> str:
    """File name of the vision graph of a non-default resolution bucket."""
    return f"vision_{int(size[0])}x{int(size[1])}.onnx"


def external_data(file: str) -> str:
    """Where a graph's weights go when they are stored outside the .onnx file."""
    return f"{file}.data"


# Fields of the nested records.
class Graph:        # an ONNX graph: {"file", "inputs": {name: {"shape", "dtype"}}, "outputs": {...}}
    FILE, INPUTS, OUTPUTS, SHAPE, DTYPE = "file", "inputs", "outputs", "shape", "dtype"


class Bucket:       # one resolution bucket (+ "validation": a report with PASSED, when validated)
    SIZE, GRID, NUM_IMAGE_TOKENS, FILE, VALIDATION = "size", "grid", "num_image_tokens", "file", "validation"


class Engine:       # a TensorRT engine written by build-engine; BATCH = {"min", "opt", "max"}
    FILE, TIMING_CACHE, TENSORRT_VERSION = "file", "timing_cache", "tensorrt_version"
    GPU_NAME, COMPUTE_CAPABILITY, PRECISION = "gpu_name", "compute_capability", "precision"
    BATCH, BUILT = "batch", "built"
    PRECISIONS = ("fp32", "fp16", "int8")


class EmbedTable:   # llm.embed_table (runtime/embedding.py): logical [V, D] rows of `dtype`, stored as `tensors`
    # {name: {"offset", "shape", "dtype"}} inside `file`; block-quantized (MatMulNBits layout) when `bits` is set

    FILE, SHAPE, DTYPE, TENSORS, OFFSET = "file", "shape", "dtype", "tensors", "offset"
    BITS, BLOCK_SIZE = "bits", "block_size"
    WEIGHT = "weight"                                           # float [V, D]
    DATA, SCALES, ZERO_POINTS = "data", "scales", "zero_points"  # MatMulNBits layout


class Quantization:  # llm.quantization: how the decoder's MatMuls were quantized (export/quantize.py)
    METHOD, BITS, BLOCK_SIZE, SYMMETRIC = "method", "bits", "block_size", "symmetric"
    ALGORITHM, ACCURACY_LEVEL, LM_HEAD = "algorithm", "accuracy_level", "lm_head"
    LM_HEAD_BITS, MIN_DIGITS = "lm_head_bits", "min_digits"   # absent in bundles of before: head as the rest
    LM_HEAD_SHORTLIST = "lm_head_shortlist"   # > 0: 4-bit draft head, its top rows rescored at 8 bits (absent: 0)


# LLM weight precisions (--llm-precision): float graphs, or weight-only int8/int4 MatMuls on float32 activations
PRECISIONS = ("fp32", "fp16", "int8", "int4")
# how the runtime keeps the KV cache (llm.kv_cache): "shared" = one preallocated buffer bound as past and present
# of every layer (the fused decoder's GroupQueryAttention writes in place); "separate" = past in, present out
KV_CACHES = ("shared", "separate")

class ScorerRecord:  # the scorer a learned-scorer pruner ran; TRAINED false = the untrained baseline (+ SEED)
    FILE, SHA256, RECIPE, TRAINED, SEED = "file", "sha256", "recipe", "trained", "seed"
class Stage:        # one in-LLM stage of llm_stage.stages: from layer LAYER on, KEEP_IN image tokens -> KEEP_OUT
    LAYER, KEEP_IN, KEEP_OUT = "layer", "keep_in", "keep_out"


PASSED = "passed"   # the one flag of every validation report


# ---- value kinds --------------------------------------------------------------------------------
class Kind:
    """What JSON value a key holds: `expected` says it in words (read's BundleError quotes it) and
    `test(value)` checks it, nested records included, so readers can index what `read` returned without
    guarding against a hand-edited manifest (a string where K should be, a graph without its file)."""

    def __init__(self, expected: str, test: Callable[[object], bool]):
        self.expected, self.test = expected, test

    def __call__(self, value) -> bool:
        return self.test(value)


def _int(v, low: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _str_map(v, value: Callable[[object], bool]) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and value(x) for k, x in v.items())


def _dims(v) -> bool:       # a graph shape: ints, symbolic names, or null (unknown)
    return isinstance(v, list) and all(d is None or isinstance(d, str) or _int(d, 0) for d in v)


def _graph_values(v) -> bool:
    return _str_map(v, lambda io: (isinstance(io, dict) and _dims(io.get(Graph.SHAPE))
                                   and isinstance(io.get(Graph.DTYPE), str)))


def _report(v) -> bool:
    return isinstance(v, dict) and isinstance(v.get(PASSED), bool)


def _size(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_int(d) for d in v)


def _bucket(v) -> bool:
    return (isinstance(v, dict) and _size(v.get(Bucket.SIZE)) and _size(v.get(Bucket.GRID))
            and _int(v.get(Bucket.NUM_IMAGE_TOKENS)) and isinstance(v.get(Bucket.FILE), str)
            and (v.get(Bucket.VALIDATION) is None or _report(v[Bucket.VALIDATION])))


_SHA256 = frozenset("0123456789abcdef")

TEXT = Kind("a string", lambda v: isinstance(v, str))
TEXT_OR_NULL = Kind("a string or null", lambda v: v is None or isinstance(v, str))
COUNT = Kind("an integer >= 1", _int)
COUNT0 = Kind("an integer >= 0", lambda v: _int(v, 0))
COUNT_OR_NULL = Kind("an integer >= 1 or null", lambda v: v is None or _int(v))
SIZE = Kind("[height, width], integers >= 1", _size)
TOKEN_IDS = Kind("a list of token ids (integers >= 0)", lambda v: isinstance(v, list) and all(_int(i, 0) for i in v))
NAMES = Kind("a list of strings", lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v))
OBJECT = Kind("a JSON object", lambda v: isinstance(v, dict))
TEMPLATE = Kind("an object with strings 'prefix' and 'suffix'",
                lambda v: isinstance(v, dict) and isinstance(v.get("prefix"), str) and isinstance(v.get("suffix"), str))
DTYPE = Kind("'float32' or 'float16'", lambda v: v in ("float32", "float16"))
GRAPH = Kind("a graph record {file: str, inputs/outputs: {name: {shape: [int|str|null], dtype: str}}}",
             lambda v: (isinstance(v, dict) and isinstance(v.get(Graph.FILE), str)
                        and _graph_values(v.get(Graph.INPUTS)) and _graph_values(v.get(Graph.OUTPUTS))))
BUCKETS = Kind("null or a non-empty list of bucket records {size: [h, w], grid: [h, w], num_image_tokens: int, "
               "file: str}", lambda v: v is None or (isinstance(v, list) and bool(v) and all(map(_bucket, v))))
SHA256S = Kind("a non-empty object {relative path: sha256 as 64 lowercase hex digits}",
               lambda v: bool(v) and _str_map(v, lambda h: isinstance(h, str) and len(h) == 64 and set(h) <= _SHA256))
GRAPH_OR_NULL = Kind("null or " + GRAPH.expected, lambda v: v is None or GRAPH(v))
PRECISION = Kind(f"one of {', '.join(PRECISIONS)} or null", lambda v: v is None or v in PRECISIONS)
KV_CACHE = Kind(f"one of {', '.join(KV_CACHES)}", lambda v: v in KV_CACHES)


def _tensor_record(v) -> bool:
    return (isinstance(v, dict) and _int(v.get(EmbedTable.OFFSET), 0) and isinstance(v.get(EmbedTable.DTYPE), str)
            and isinstance(v.get(EmbedTable.SHAPE), list) and all(_int(d) for d in v[EmbedTable.SHAPE]))


EMBED_TABLE = Kind("null or an embedding table record {file: str, shape: [V, D], dtype: str, tensors: {name: "
                   "{offset, shape, dtype}}}", lambda v: v is None or (
    isinstance(v, dict) and isinstance(v.get(EmbedTable.FILE), str) and isinstance(v.get(EmbedTable.DTYPE), str)
    and isinstance(v.get(EmbedTable.SHAPE), list) and len(v[EmbedTable.SHAPE]) == 2
    and all(_int(d) for d in v[EmbedTable.SHAPE]) and bool(v.get(EmbedTable.TENSORS))
    and _str_map(v[EmbedTable.TENSORS], _tensor_record)
    and all(v.get(f) is None or _int(v[f]) for f in (EmbedTable.BITS, EmbedTable.BLOCK_SIZE))))
QUANTIZATION = Kind("null or a quantization record {method: str, bits: 4|8, block_size: int, ...}", lambda v: v is None or (
    isinstance(v, dict) and isinstance(v.get(Quantization.METHOD), str) and v.get(Quantization.BITS) in (4, 8)
    and _int(v.get(Quantization.BLOCK_SIZE))))

SCORER = Kind("null or a scorer record {trained: bool, file: str|null, sha256: str|null, recipe: str|null, "
               "seed: int|null}", lambda v: v is None or (
    isinstance(v, dict) and isinstance(v.get(ScorerRecord.TRAINED), bool)
    and all(v.get(f) is None or isinstance(v[f], str)
            for f in (ScorerRecord.FILE, ScorerRecord.SHA256, ScorerRecord.RECIPE))
    and (v.get(ScorerRecord.SEED) is None or _int(v[ScorerRecord.SEED], 0))))
OBJECT_OR_NULL = Kind("null or a JSON object", lambda v: v is None or isinstance(v, dict))
NUMBER_OR_NULL = Kind("null or a number", lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))
LAYERS = Kind("a non-empty list of increasing layer indices starting at 0",
              lambda v: isinstance(v, list) and bool(v) and v[0] == 0 and all(_int(i, 0) for i in v)
              and all(a < b for a, b in zip(v, v[1:])))
STAGES = Kind("a list of stage records {layer: int >= 1, keep_in: int >= 1, keep_out: int >= 1}",
              lambda v: isinstance(v, list) and all(isinstance(s, dict) and all(_int(s.get(f)) for f in (
                  Stage.LAYER, Stage.KEEP_IN, Stage.KEEP_OUT)) for s in v))
COUNT0 = Kind("an integer >= 0", lambda v: _int(v, 0))
REPORT = Kind("null or a report object with a boolean 'passed'", lambda v: v is None or _report(v))
ENGINE = Kind("null or an engine record {file: str, ...}", lambda v: v is None or (
    isinstance(v, dict) and isinstance(v.get(Engine.FILE), str)
    and all(v.get(f) is None or isinstance(v[f], str) for f in (Engine.TIMING_CACHE, Engine.TENSORRT_VERSION,
                                                               Engine.GPU_NAME, Engine.COMPUTE_CAPABILITY,
                                                               Engine.PRECISION, Engine.BUILT))
    and (v.get(Engine.BATCH) is None or (isinstance(v[Engine.BATCH], dict)
                                         and all(_int(b) for b in v[Engine.BATCH].values())))))


# ---- manifest keys ------------------------------------------------------------------------------
class Key(str):
    """A manifest key: its dotted name (a str, so it indexes the manifest directly), the Kind of value it
    holds, and for an optional key the value readers assume when a bundle lacks it (module docstring)."""

    kind: Kind
    optional: bool
    default: object

    def __new__(cls, name: str, kind: Kind, **default):
        key = super().__new__(cls, name)
        if set(default) - {"default"}:
            raise TypeError(f"Key({name!r}): only default= is accepted")
        key.kind = kind
        key.optional = "default" in default
        key.default = default.get("default")
        return key


class Keys:
    # general
    FORMAT = Key("general.format", TEXT)                            # FORMAT (schema 1: absent)
    SCHEMA_VERSION = Key("general.schema_version", COUNT)
    EDGEPRUNE_VERSION = Key("general.edgeprune_version", TEXT)
    CREATED = Key("general.created", TEXT_OR_NULL, default=None)    # ISO-8601 UTC time of export

    # model
    MODEL_FAMILY = Key("model.family", TEXT)                        # Adapter.family
    MODEL_SOURCE = Key("model.source", TEXT, default="")            # the preset or path given to export
    MODEL_GRID = Key("model.grid", SIZE)                            # [H, W] patch grid
    MODEL_NUM_IMAGE_TOKENS = Key("model.num_image_tokens", COUNT)   # N (= H * W; LLaVA-NeXT: packed length)
    MODEL_EOS_TOKEN_IDS = Key("model.eos_token_ids", TOKEN_IDS)
    MODEL_CHAT_TEMPLATE = Key("model.chat_template", TEMPLATE)      # ChatTemplate.to_dict()
    MODEL_DOMAIN = Key("model.domain", TEXT_OR_NULL, default=None)  # what the model was trained to recognise

    # pruner
    PRUNER_METHOD = Key("pruner.method", TEXT)                      # registry name
    PRUNER_KEEP = Key("pruner.keep", COUNT)                         # K (= N when not pruned)
    PRUNER_CONFIG = Key("pruner.config", OBJECT)                    # options the pruner was built with (JSON; arrays
                                                                    # as {"file": "pruner/<k>.npy", "shape", "dtype"})
    PRUNER_CONFIG_OMITTED = Key("pruner.config_omitted", OBJECT, default={})  # {option: why not in pruner.config}
    PRUNER_SPACE = Key("pruner.space", TEXT, default="tokens")      # "tokens" or "feats"
    PRUNER_EXTRA_OUTPUTS = Key("pruner.extra_outputs", NAMES)       # extra vision graph outputs
    PRUNER_SCORER = Key("pruner.scorer", SCORER, default=None)      # ScorerRecord of a learned scorer (autoselect);
                                                                    # null = the method has none

    # positions
    POSITIONS_MODE = Key("positions.mode", TEXT)                    # runtime.positions.POSITION_MODES
    POSITIONS_ROPE = Key("positions.rope", TEXT)                    # runtime.positions.ROPE_KINDS ("1d" | "mrope")

    # vision graph and encoder facts
    VISION_GRAPH = Key("vision.graph", GRAPH)
    VISION_DTYPE = Key("vision.dtype", DTYPE)                       # of the ONNX graph
    VISION_BATCH = Key("vision.batch", COUNT_OR_NULL)               # null for a dynamic batch
    VISION_BUCKETS = Key("vision.buckets", BUCKETS, default=None)   # resolution buckets; null = one size
                                                                    # (the first is vision.onnx / model.grid)
    VISION_NUM_LAYERS = Key("vision.num_layers", COUNT)             # encoder layers
    VISION_HIDDEN_SIZE = Key("vision.hidden_size", COUNT)           # encoder width
    VISION_TOKENS_PER_VIEW = Key("vision.tokens_per_view", COUNT)   # tokens one encoder pass attends over (+ [CLS])
    VISION_VIEWS = Key("vision.views", COUNT)                       # encoder passes per image (LLaVA-NeXT: 1 + crops)

    # LLM graphs and facts
    LLM_EMBED_GRAPH = Key("llm.embed_graph", GRAPH_OR_NULL, default=None)  # embed.onnx: bundles before embed_table
    LLM_EMBED_TABLE = Key("llm.embed_table", EMBED_TABLE, default=None)    # EmbedTable record (null: embed graph)
    LLM_DECODER_GRAPH = Key("llm.decoder_graph", GRAPH)
    LLM_DTYPE = Key("llm.dtype", DTYPE)                             # weights and KV cache
    LLM_ATTENTION = Key("llm.attention", TEXT)                      # "fused" (GroupQueryAttention) | "plain"
    LLM_NUM_LAYERS = Key("llm.num_layers", COUNT)
    LLM_NUM_HEADS = Key("llm.num_heads", COUNT)                     # query heads
    LLM_NUM_KV_HEADS = Key("llm.num_kv_heads", COUNT)
    LLM_HEAD_DIM = Key("llm.head_dim", COUNT)
    LLM_HIDDEN_SIZE = Key("llm.hidden_size", COUNT)
    LLM_INTERMEDIATE_SIZE = Key("llm.intermediate_size", COUNT)     # MLP width
    LLM_VOCAB_SIZE = Key("llm.vocab_size", COUNT)
    LLM_CONTEXT_LENGTH = Key("llm.context_length", COUNT)           # max_position_embeddings: largest position id + 1
    LLM_DEEPSTACK_LAYERS = Key("llm.deepstack_layers", COUNT0, default=0)  # L > 0: the vision graph outputs
                                                                    # DeepStack features, the decoder takes them
    LLM_PRECISION = Key("llm.precision", PRECISION, default=None)   # PRECISIONS; null: llm.dtype's float precision
    LLM_QUANTIZATION = Key("llm.quantization", QUANTIZATION, default=None)  # Quantization record; null: float weights
    LLM_KV_CACHE = Key("llm.kv_cache", KV_CACHE, default="separate")  # KV_CACHES (the decoder's kind for the runtime)
    LLM_MIN_ONNXRUNTIME = Key("llm.min_onnxruntime", TEXT_OR_NULL, default=None)  # "X.Y": oldest ORT for its ops
    LLM_NUM_PARAMETERS = Key("llm.num_parameters", COUNT_OR_NULL, default=None)   # the torch model's, pre-quantization
    LLM_KV_GROUPS = Key("llm.kv_groups", LAYERS, default=[0])       # first layer of each group of layers whose KV
                                                                    # cache has its own length (one mask input each)
    LLM_PREFILL_GRAPH = Key("llm.prefill_graph", GRAPH_OR_NULL, default=None)  # prefill.onnx (in-LLM stage only)
    LLM_PREFILL_WEIGHTS = Key("llm.prefill_weights", OBJECT_OR_NULL, default=None)  # what prefill.onnx shares with
                                                                    # decoder.onnx.data (export/inllm.share_weights)

    # in-LLM stage (METHODS_INLLM.md, runtime/stages.py): null method = none (then llm.prefill_graph is null)
    LLM_STAGE_METHOD = Key("llm_stage.method", TEXT_OR_NULL, default=None)   # edgeprune.inllm registry name
    LLM_STAGE_CONFIG = Key("llm_stage.config", OBJECT, default={})  # its options (arrays as llm_stage/<k>.npy records)
    LLM_STAGE_STAGES = Key("llm_stage.stages", STAGES, default=[])  # Stage records in layer order
    LLM_STAGE_KV_POLICY = Key("llm_stage.kv_policy", TEXT_OR_NULL, default=None)  # "uniform" | "faithful"
    LLM_STAGE_IMAGE_START = Key("llm_stage.image_start", COUNT0, default=0)  # S: prompt tokens before the image
    LLM_STAGE_MIN_TEXT_TOKENS = Key("llm_stage.min_text_tokens", COUNT0, default=0)  # valid tokens a row needs
                                                                                       # after the image
    LLM_STAGE_LAYER_AVERAGE = Key("llm_stage.layer_average", NUMBER_OR_NULL, default=None)  # layer-average visual
                                                                    # tokens (METHODS_INLLM.md §1, Budget rule)

    # files, checks and engines
    FILES_SHA256 = Key("files.sha256", SHA256S)                     # {relative path: sha256 hex}
    VALIDATION_VISION = Key("validation.vision", REPORT, default=None)  # ORT vs torch report of vision.onnx
    VALIDATION_LLM = Key("validation.llm", REPORT, default=None)    # ORT vs torch report of the LLM graphs
    ENGINE_VISION = Key("engines.vision", ENGINE, default=None)     # Engine record of engines/vision.plan




def llm_precision(manifest: dict) -> str:
    """The LLM's weight precision (PRECISIONS): llm.precision, or llm.dtype's for bundles that predate it."""
    return manifest[Keys.LLM_PRECISION] or {"float32": "fp32", "float16": "fp16"}[manifest[Keys.LLM_DTYPE]]


def _all_keys() -> list[Key]:
    return [v for v in vars(Keys).values() if isinstance(v, Key)]


def required_keys() -> list[Key]:
    return [k for k in _all_keys() if not k.optional]


def optional_keys() -> list[Key]:
    return [k for k in _all_keys() if k.optional]


def llm_keys() -> list[Key]:
    """The keys that describe the LLM graphs (what a bundle reusing another's LLM copies)."""
    return [k for k in _all_keys() if k.startswith("llm.")] + [Keys.POSITIONS_ROPE]


# ---- reading ------------------------------------------------------------------------------------
def read(manifest: dict, where: str = Files.MANIFEST) -> dict:
    """Check a parsed manifest.json and return it in the current layout: format marker, schema range,
    older schemas migrated, required keys present, optional keys' defaults filled in. BundleError
    messages start with `where` (the manifest's path)."""
    try:
        return _read(manifest)
    except _FormatError as err:
        raise BundleError(f"{where}: {err}") from None


class _FormatError(ValueError):
    pass


def recognise(manifest) -> str | None:
    """None when parsed JSON `manifest` is an edgeprune manifest by its own marker (general.format; schema 1,
    which predates it: schema_version 1 and its llm.spec), else why not. Nothing else is checked, so a
    damaged bundle is still recognised (export --force may replace it; read() refuses it)."""
    if not isinstance(manifest, dict):
        return f"expected a JSON object, got {type(manifest).__name__}"
    version, marker = manifest.get(Keys.SCHEMA_VERSION), manifest.get(Keys.FORMAT)
    if marker is None and not (version == 1 and not isinstance(version, bool) and "llm.spec" in manifest):
        return f"not an edgeprune bundle manifest ({Keys.FORMAT} absent, {Keys.SCHEMA_VERSION}={version!r})"
    if marker is not None and marker != FORMAT:
        return f"{Keys.FORMAT}={marker!r:.60}: not an edgeprune bundle (expected {FORMAT!r})"
    return None


def _read(manifest: dict) -> dict:
    problem = recognise(manifest)
    if problem:
        raise _FormatError(problem)
    version = manifest[Keys.SCHEMA_VERSION]
    if isinstance(version, bool) or not isinstance(version, int) or not MIN_SCHEMA_VERSION <= version <= SCHEMA_VERSION:
        raise _FormatError(f"schema {version!r}, this runtime reads {MIN_SCHEMA_VERSION}-{SCHEMA_VERSION}"
                          + ("; upgrade edgeprune" if isinstance(version, int) and version > SCHEMA_VERSION else ""))
    out = _migrate_v1(manifest) if version == 1 else dict(manifest)
    missing = [key for key in required_keys() if key not in out]
    if missing:
        raise _FormatError(f"missing key(s) {', '.join(missing)}")
    for key in optional_keys():
        if out.get(key) is None:
            out[key] = json.loads(json.dumps(key.default))   # a fresh copy of a mutable default
    for key in _all_keys():
        if out[key] is UNKNOWN and version == 1 and key in _V1_UNRECORDED:
            continue
        if not key.kind(out[key]):
            raise _FormatError(f"{key}={_quote(out[key])}: expected {key.kind.expected}")
    return out


def _quote(value, limit: int = 60) -> str:
    text = json.dumps(value, allow_nan=True)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def known(manifest: dict, key: Key):
    """The value of `key`, or a BundleError when a migrated older bundle never recorded it."""
    value = manifest[key]
    if value is UNKNOWN:
        raise BundleError(f"{key} is not recorded in this schema-{manifest[Keys.SCHEMA_VERSION]} bundle; "
                          "re-export it with this edgeprune version")
    return value


def _v1_graph(part: dict, dtypes: dict[str, str]) -> dict:
    """v1 llm.spec graph {"file", "inputs": {name: dims}, ...} -> a Graph record (dtypes by name)."""
    def io(values: dict) -> dict:
        return {name: {Graph.SHAPE: list(dims), Graph.DTYPE: dtypes.get(name, dtypes["*"])} for name, dims in values.items()}
    return {Graph.FILE: part["file"], Graph.INPUTS: io(part["inputs"]), Graph.OUTPUTS: io(part["outputs"])}


_V1_UNRECORDED = (Keys.LLM_NUM_HEADS, Keys.LLM_INTERMEDIATE_SIZE, Keys.LLM_CONTEXT_LENGTH, Keys.VISION_NUM_LAYERS,
                  Keys.VISION_HIDDEN_SIZE, Keys.VISION_TOKENS_PER_VIEW, Keys.VISION_VIEWS)


def _migrate_v1(m: dict) -> dict:
    """Schema 1 -> 2 (the only migration; module docstring lists what changed)."""
    out = {k: v for k, v in m.items() if k not in ("llm.spec", "validation", "engines")}
    out[Keys.FORMAT] = FORMAT
    out.setdefault(Keys.POSITIONS_ROPE, "1d")           # schema 1 wrote it only once M-RoPE existed
    spec = m.get("llm.spec")
    if not isinstance(spec, dict):
        raise _FormatError("schema 1 manifest without an llm.spec object")
    try:
        dtype = spec["dtype"]
        ints = {"input_ids": "int64", "position_ids": "int64", "attention_mask": "int64", "logits": "float32"}
        out[Keys.LLM_EMBED_GRAPH] = _v1_graph(spec["embed"], {**ints, "*": dtype})
        out[Keys.LLM_DECODER_GRAPH] = _v1_graph(spec["decoder"], {**ints, "*": dtype})
        for key, name in ((Keys.LLM_NUM_LAYERS, "num_layers"), (Keys.LLM_NUM_KV_HEADS, "num_kv_heads"),
                          (Keys.LLM_HEAD_DIM, "head_dim"), (Keys.LLM_HIDDEN_SIZE, "hidden_size"),
                          (Keys.LLM_VOCAB_SIZE, "vocab_size")):
            out[key] = spec[name]
    except (KeyError, TypeError) as err:
        raise _FormatError(f"schema 1 llm.spec lacks {err}") from None
    out[Keys.LLM_DTYPE] = dtype
    out[Keys.LLM_ATTENTION] = spec.get("attention", "plain")   # the earliest v1 exports had only plain attention
    for key in _V1_UNRECORDED:
        out[key] = UNKNOWN                                     # schema 1 never recorded these
    validation = m.get("validation") or {}
    for key, part in ((Keys.VALIDATION_VISION, "vision"), (Keys.VALIDATION_LLM, "llm")):
        report = validation.get(part)
        if report is not None:
            report = dict(report)
            if "ok" in report:                                 # schema 1's LLM flag
                report[PASSED] = report.pop("ok")
            out[key] = report
    vision_engine = (m.get("engines") or {}).get("vision")
    if vision_engine is not None:
        out[Keys.ENGINE_VISION] = dict(vision_engine)          # no GPU facts: the runtime asks for a rebuild
    return out


# ---- writing ------------------------------------------------------------------------------------
def write_manifest(folder: str | Path, manifest: dict) -> dict:
    """Write `folder`/manifest.json atomically in the current schema (export and build-engine).

    Stamps the format marker and schema version, refuses a manifest that lacks a required key, and returns
    what was written (an optional key written as null reads as its default)."""
    out = {str(k): v for k, v in manifest.items()}
    out.update({str(Keys.FORMAT): FORMAT, str(Keys.SCHEMA_VERSION): SCHEMA_VERSION})
    missing = [key for key in required_keys() if key not in out]
    if missing:
        raise BundleError(f"{Path(folder) / Files.MANIFEST}: the manifest to write lacks required key(s) "
                          f"{', '.join(missing)}")
    folder = Path(folder)
    tmp = folder / f".{Files.MANIFEST}.tmp"
    tmp.write_text(json.dumps(out, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, folder / Files.MANIFEST)
    return out
