"""The bundle format, named once: file names, manifest keys and the schema version.

Both sides import this torch-free module: `edgeprune.export.bundle` writes a bundle with it and
`edgeprune.runtime.bundle` reads one (the gguf split: `gguf/constants.py` for writer and reader).

A bundle is a folder:

    manifest.json      flat JSON object, keys are the dotted `Keys` below
    vision.onnx        pixels -> image_tokens [B,K,D], positions [B,K] (+ pruner extras)
    vision_<h>x<w>.onnx  the same for each further resolution bucket (optional, vision.buckets)
    embed.onnx         token ids -> embeddings           (+ embed.onnx.data when large)
    decoder.onnx       one graph for prefill and decode  (+ decoder.onnx.data)
    tokenizer.json     tokenizers.Tokenizer
    preprocess.json    runtime.preprocess.PreprocessConfig
    engines/           TensorRT engines and timing cache (edgeprune build-engine, optional)

Every file except manifest.json is listed with its sha256 under `files.sha256`; the runtime refuses
a bundle whose files are missing or differ.
"""
from __future__ import annotations

__all__ = ["SCHEMA_VERSION", "MIN_SCHEMA_VERSION", "Files", "Keys", "REQUIRED_KEYS", "VISION_INPUT",
           "VISION_TOKENS", "VISION_POSITIONS"]

# Bump on any change a reader of the previous version would misread; readers accept MIN..SCHEMA.
SCHEMA_VERSION = 1
MIN_SCHEMA_VERSION = 1

# Vision graph input/output names (the pruner's extras follow the two outputs, by name).
VISION_INPUT = "pixels"
VISION_TOKENS = "image_tokens"
VISION_POSITIONS = "positions"


class Files:
    MANIFEST = "manifest.json"
    VISION = "vision.onnx"
    EMBED = "embed.onnx"
    DECODER = "decoder.onnx"
    TOKENIZER = "tokenizer.json"
    PREPROCESS = "preprocess.json"
    ENGINES = "engines"                      # folder written by build-engine
    VISION_ENGINE = "engines/vision.plan"
    TIMING_CACHE = "engines/timing.cache"


class Keys:
    # general
    SCHEMA_VERSION = "general.schema_version"        # int
    EDGEPRUNE_VERSION = "general.edgeprune_version"  # str
    CREATED = "general.created"                      # ISO-8601 UTC time of export

    # model
    MODEL_FAMILY = "model.family"                    # str, Adapter.family
    MODEL_SOURCE = "model.source"                    # str, the preset or path given to export
    MODEL_GRID = "model.grid"                        # [H, W] patch grid
    MODEL_NUM_IMAGE_TOKENS = "model.num_image_tokens"  # N = H * W
    MODEL_EOS_TOKEN_IDS = "model.eos_token_ids"      # [int]
    MODEL_CHAT_TEMPLATE = "model.chat_template"      # ChatTemplate.to_dict()

    # pruner
    PRUNER_METHOD = "pruner.method"                  # registry name
    PRUNER_KEEP = "pruner.keep"                      # K (= N when not pruned)
    PRUNER_CONFIG = "pruner.config"                  # JSON-serialisable options the pruner was built with
    PRUNER_CONFIG_OMITTED = "pruner.config_omitted"  # {option: why it is not in pruner.config}
    PRUNER_SPACE = "pruner.space"                    # "tokens" or "feats"
    PRUNER_EXTRA_OUTPUTS = "pruner.extra_outputs"    # [name] extra vision graph outputs

    # positions
    POSITIONS_MODE = "positions.mode"                # runtime.positions.POSITION_MODES
    POSITIONS_ROPE = "positions.rope"                # runtime.positions.ROPE_KINDS; absent = "1d" (older bundles)

    # graphs: {"file", "inputs": {name: {"shape", "dtype"}}, "outputs": {...}}
    VISION_GRAPH = "vision.graph"
    VISION_DTYPE = "vision.dtype"                    # "float32" | "float16" (weights/compute)
    VISION_BATCH = "vision.batch"                    # int, or null for a dynamic batch
    # resolution buckets (optional; absent = one size): [{"size": [h, w], "grid": [H, W], "num_image_tokens": N,
    # "file": name, "validation": {...}}], the first is vision.onnx / model.grid / preprocess.json
    VISION_BUCKETS = "vision.buckets"
    LLM_SPEC = "llm.spec"                            # the dict export_llm returned (graphs, layers, dtype, ...)

    # files and checks
    FILES_SHA256 = "files.sha256"                    # {relative path: sha256 hex}
    VALIDATION = "validation"                        # {"vision": {...}, "llm": {...}}
    ENGINES = "engines"                              # {"vision": {...}} written by build-engine


REQUIRED_KEYS = (
    Keys.SCHEMA_VERSION, Keys.EDGEPRUNE_VERSION, Keys.MODEL_FAMILY, Keys.MODEL_GRID, Keys.MODEL_NUM_IMAGE_TOKENS,
    Keys.MODEL_EOS_TOKEN_IDS, Keys.MODEL_CHAT_TEMPLATE, Keys.PRUNER_METHOD, Keys.PRUNER_KEEP, Keys.PRUNER_CONFIG,
    Keys.PRUNER_EXTRA_OUTPUTS, Keys.POSITIONS_MODE, Keys.VISION_GRAPH, Keys.LLM_SPEC, Keys.FILES_SHA256,
)
