"""Summarise a bundle's manifest (model, method, K, positions, graphs, validation) and check it as `run` does.

Checks the files (listed, inside the bundle, sha256 as recorded; --no-verify skips the hashing) and the
graphs against the manifest (K, extras, input size and batch, LLM layers, heads, width, vocabulary,
dtype), lists files the manifest does not list, and exits 1 on the first problem.
"""
from __future__ import annotations

from edgeprune.runtime.format import Graph, ScorerRecord


def add_parser(subparsers):
    from edgeprune.cli.args import add_bundle_args

    p = subparsers.add_parser("inspect", help=__doc__.splitlines()[0], description=__doc__)
    add_bundle_args(p)
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    p.add_argument("--no-verify", action="store_true", help="do not hash the files")
    return p


def run(args) -> int:
    import json

    from edgeprune.cli.export import parity_lines
    from edgeprune.errors import BundleError
    from edgeprune.runtime.bundle import load_bundle, read_manifest
    from edgeprune.runtime.format import Keys

    manifest = read_manifest(args.bundle)          # marker, schema, keys and their types: a BundleError stops here
    files_problem = graphs_problem = None
    unlisted = ()
    try:
        unlisted = load_bundle(args.bundle, verify=not args.no_verify).unlisted
    except BundleError as err:
        files_problem = str(err)
    if files_problem is None:
        try:
            _open_like_run(args.bundle)
        except BundleError as err:
            graphs_problem = str(err)
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        print(summary(manifest, args.bundle))
        print("\n".join(parity_lines(manifest)))
        hashed = "sha256 not checked (--no-verify)" if args.no_verify else "sha256 checked"
        print(f"files: {'OK' if files_problem is None else 'ERROR'} ({len(manifest[Keys.FILES_SHA256])} files, "
              f"{hashed})")
        print(f"graphs: {'ERROR' if graphs_problem else 'not checked' if files_problem else 'OK'} (K, extras, "
              "input size and batch, LLM layers, heads, width, vocabulary and dtype against the manifest)")
        for rel in unlisted:
            print(f"unlisted: {rel} (not in the manifest; the runtime never opens it)")
    if files_problem or graphs_problem:
        raise BundleError(files_problem or graphs_problem)
    return 0


def _open_like_run(bundle) -> None:
    """Load the graphs the way `run` does (its checks of the graphs against the manifest), without hashing again."""
    from edgeprune.runtime.pipeline import Pipeline

    Pipeline(bundle, threads=1, verify=False)


def summary(m: dict, path) -> str:
    from edgeprune.runtime.format import EmbedTable, Engine, Files, Keys
    from edgeprune.runtime.llm import describe_precision

    cfg = ", ".join(f"{k}={v}" for k, v in m[Keys.PRUNER_CONFIG].items()) or "-"
    lines = [
        f"bundle {path} (schema {m[Keys.SCHEMA_VERSION]}, edgeprune {m[Keys.EDGEPRUNE_VERSION]}, "
        f"created {m[Keys.CREATED] or '?'})",
        f"model:     {m[Keys.MODEL_SOURCE] or '?'} (family {m[Keys.MODEL_FAMILY]}), grid "
        f"{'x'.join(map(str, m[Keys.MODEL_GRID]))} = N {m[Keys.MODEL_NUM_IMAGE_TOKENS]}, eos {m[Keys.MODEL_EOS_TOKEN_IDS]}",
        f"pruner:    {m[Keys.PRUNER_METHOD]} K={m[Keys.PRUNER_KEEP]} ({cfg}); extras: "
        f"{', '.join(m[Keys.PRUNER_EXTRA_OUTPUTS]) or '-'}",
        f"positions: {m[Keys.POSITIONS_MODE]}",
    ]
    scorer = m[Keys.PRUNER_SCORER]
    if scorer:
        lines.insert(3, f"scorer:    {_scorer(scorer)}")
    if m[Keys.MODEL_DOMAIN]:
        lines.insert(2, f"domain:    trained to recognise {m[Keys.MODEL_DOMAIN]}")
    if m[Keys.LLM_STAGE_METHOD] is not None:
        lines.append(f"in-LLM:    {stage_text(m)}")
    graphs = [("vision", m[Keys.VISION_GRAPH]), ("embed", m[Keys.LLM_EMBED_GRAPH]),
              ("prefill", m[Keys.LLM_PREFILL_GRAPH]), ("decoder", m[Keys.LLM_DECODER_GRAPH])]
    # embed: older bundles only; prefill: in-LLM stage only
    for name, graph in [(name, graph) for name, graph in graphs if graph is not None]:
        ins = "; ".join(f"{k} {_shape(v)}" for k, v in graph[Graph.INPUTS].items())
        outs = "; ".join(f"{k} {_shape(v)}" for k, v in graph[Graph.OUTPUTS].items())
        if name in ("decoder", "prefill"):  # dozens of past/present tensors: list the first of each kind
            ins = _fold(graph[Graph.INPUTS], "past_key_values", ins)
            outs = _fold(graph[Graph.OUTPUTS], "present", outs)
        lines.append(f"{name + ':':<10} {graph[Graph.FILE]}: {ins} -> {outs}")
    lines.append(f"llm:       {m[Keys.LLM_NUM_LAYERS]} layers, hidden {m[Keys.LLM_HIDDEN_SIZE]}, vocab "
                 f"{m[Keys.LLM_VOCAB_SIZE]}, context {m[Keys.LLM_CONTEXT_LENGTH] or '?'}, {m[Keys.LLM_DTYPE]}, attention "
                 f"{m[Keys.LLM_ATTENTION]}, KV cache {m[Keys.LLM_KV_CACHE]}")
    lines.append(f"precision: {describe_precision(m)}")
    table = m[Keys.LLM_EMBED_TABLE]
    if table is not None:
        lines.append(f"embedding: {table[EmbedTable.FILE]}: [{', '.join(map(str, table[EmbedTable.SHAPE]))}] "
                     f"{table[EmbedTable.DTYPE]}"
                     + (f", {table[EmbedTable.BITS]}-bit blocks of {table[EmbedTable.BLOCK_SIZE]}"
                        if table.get(EmbedTable.BITS) else "")
                     + (" (the LM head's weight, stored once)" if table[EmbedTable.FILE] != Files.EMBED_TABLE else ""))
    engine = m[Keys.ENGINE_VISION]
    if engine:
        lines.append(f"engine:    vision: {engine[Engine.FILE]} (TensorRT {engine.get(Engine.TENSORRT_VERSION, '?')}, "
                     f"{engine.get(Engine.PRECISION, '?')}, {engine.get(Engine.GPU_NAME, 'GPU not recorded')})")
    return "\n".join(lines)


def _scorer(record: dict) -> str:
    if not record[ScorerRecord.TRAINED]:
        return f"random, untrained (seed {record[ScorerRecord.SEED]}): the baseline, not a trained scorer"
    return (f"{record[ScorerRecord.FILE] or 'in-memory module'}, sha256 {record[ScorerRecord.SHA256] or '?'}, "
            f"recipe {record[ScorerRecord.RECIPE] or '?'}")
def stage_text(m: dict) -> str:
    """One line on a bundle's in-LLM stage: method, stages, options, KV policy, layer average, and the graph
    that runs it (prefill.onnx with the bundle's attention kind; decode runs decoder.onnx)."""
    from edgeprune.runtime.format import Keys, Stage

    stages = ", ".join(f"L={s[Stage.LAYER]}: {s[Stage.KEEP_IN]} -> {s[Stage.KEEP_OUT]}" for s in m[Keys.LLM_STAGE_STAGES])
    cfg = ", ".join(f"{k}={v}" for k, v in m[Keys.LLM_STAGE_CONFIG].items()) or "-"
    average = m[Keys.LLM_STAGE_LAYER_AVERAGE]
    return (f"{m[Keys.LLM_STAGE_METHOD]} {stages} ({cfg}); KV policy {m[Keys.LLM_STAGE_KV_POLICY]}; layer-average "
            f"visual tokens {'?' if average is None else f'{average:.1f}'}; prefill runs "
            f"{m[Keys.LLM_PREFILL_GRAPH][Graph.FILE]} ({m[Keys.LLM_ATTENTION]} attention)")


def _shape(v) -> str:
    return "[" + ", ".join(str(d) for d in v[Graph.SHAPE]) + "]"


def _fold(values: dict, prefix: str, full: str) -> str:
    kv = [k for k in values if k.startswith(prefix)]
    if len(kv) <= 2:
        return full
    rest = "; ".join(f"{k} {_shape(v)}" for k, v in values.items() if not k.startswith(prefix))
    return f"{rest}; {kv[0]} {_shape(values[kv[0]])} (+{len(kv) - 1} more {prefix}.*)"
