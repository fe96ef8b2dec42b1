"""Per-stage latency and memory of bundles on this device (`edgeprune profile`, `edgeprune sweep`).

Stages come from the runtime's own timers (runtime.pipeline.STAGES); every run is also timed as a
whole, so the report shows how much the stages leave unexplained. TTFT = preprocess + vision +
embed + prefill: the first new token comes out of the prefill. Several bundles are timed
interleaved, round-robin after warming each (profiles/interleave.py): a load change then lands on
every point of a round instead of on one point. The pruner's cost comes from ONNX Runtime's
per-node profile of the vision graph (profiles/pruner_cost.py). Torch-free.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeprune import __version__
from edgeprune.profiles import memory
from edgeprune.profiles.device import DeviceProfile
from edgeprune.profiles.flops import prefill_ratio, shapes_known
from edgeprune.profiles.interleave import paired_ratio, run_interleaved, spread_pct
from edgeprune.runtime.bundle import pruner_label
from edgeprune.runtime.format import Graph, Keys, Stage, external_data, llm_keys
from edgeprune.runtime.stages import StagePlan

__all__ = ["profile_bundle", "profile_bundles", "soak", "summarize", "kv_bytes_expected", "kv_groups", "stage_report",
           "weights_bytes", "DEFAULT_PROMPT", "REPORT_SCHEMA", "STAGE_KEYS"]

log = logging.getLogger(__name__)

REPORT_SCHEMA = 2   # 2: interleaved runs, per-round samples, spread_pct, pruner cost from the ORT node profile
DEFAULT_PROMPT = "Describe the image in one sentence."
DEFAULT_IMAGE = Path(__file__).resolve().parent / "chelsea.png"   # timing only: the answer is not shown
STAGE_KEYS = ("preprocess", "vision", "embed", "prefill", "decode")
TTFT_STAGES = ("preprocess", "vision", "embed", "prefill")
DTYPE_BYTES = {"float32": 4, "float16": 2}


def summarize(values: list[float]) -> dict:
    """Median, p90, min, max (seconds) of repeated measurements and spread_pct = 100 (max - min) / median."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"median": None, "p90": None, "min": None, "max": None, "spread_pct": None, "n": 0}
    return {"median": float(np.median(arr)), "p90": float(np.percentile(arr, 90)), "min": float(arr.min()),
            "max": float(arr.max()), "spread_pct": spread_pct(arr), "n": int(arr.size)}


def kv_bytes_expected(manifest: dict, batch: int, tokens: int) -> int:
    """layers x 2 (K and V) x kv_heads x head_dim x tokens x dtype size x batch."""
    return (manifest[Keys.LLM_NUM_LAYERS] * 2 * manifest[Keys.LLM_NUM_KV_HEADS] * manifest[Keys.LLM_HEAD_DIM] * tokens
            * DTYPE_BYTES[manifest[Keys.LLM_DTYPE]] * batch)


def kv_groups(manifest: dict, plan: StagePlan | None, prompt_tokens: int, decode_tokens: int, batch: int) -> list[dict]:
    """The KV cache after generation per group of layers sharing one length: {"layers": [first, end),
    "tokens", "bytes"} (one group without an in-LLM stage or under its uniform policy)."""
    t = manifest[Keys.LLM_NUM_LAYERS]
    if plan is None:
        bounds, image = [0, t], None
    else:
        bounds, image = [*plan.kv_groups, t], plan.kv_image_tokens_per_layer()
    groups = []
    for first, end in zip(bounds[:-1], bounds[1:]):
        tokens = prompt_tokens + decode_tokens - (0 if plan is None else plan.num_image - image[first])
        per_layer = kv_bytes_expected(manifest, batch, tokens) // t
        groups.append({"layers": [first, end], "tokens": tokens, "bytes": per_layer * (end - first)})
    return groups


def stage_report(manifest: dict, plan: StagePlan, prompt_tokens: int) -> dict:
    """What the manifest says of the stage, with the prefill MACs ratio it predicts (profiles/flops.py)."""
    tokens = [prompt_tokens - plan.num_image + n for n in plan.image_tokens_per_layer()]
    ratio = prefill_ratio(manifest, tokens, prompt_tokens) if shapes_known(manifest) else None
    return {"method": plan.method, "kv_policy": plan.kv_policy,
            "stages": [{Stage.LAYER: a, Stage.KEEP_IN: b, Stage.KEEP_OUT: c} for a, b, c in plan.stages],
            "layer_average": plan.layer_average, "prefill_tokens_per_layer": tokens,
            "prefill_flop_ratio_predicted": ratio, "prefill_speedup_predicted": None if ratio is None else 1 / ratio}


def weights_bytes(bundle_dir: Path, manifest: dict) -> dict:
    """Bytes on disk of the vision graph and of the LLM ('vision', 'llm': the decoder, its data and the embedding
    table or graph, each file counted once)."""
    from edgeprune.runtime.llm import llm_files

    vision = manifest[Keys.VISION_GRAPH][Graph.FILE]
    groups = {"vision": [vision, external_data(vision)], "llm": llm_files(manifest)}
    return {name: sum((bundle_dir / rel).stat().st_size for rel in rels if (bundle_dir / rel).is_file())
            for name, rels in groups.items()}


@dataclass
class _Run:
    total_s: float
    result: object  # runtime.pipeline.Result


def _run_once(pipeline, image, prompt: str, new_tokens: int) -> _Run:
    start = time.perf_counter()
    result = pipeline(image, prompt, max_new_tokens=new_tokens)
    return _Run(time.perf_counter() - start, result)


def _device_memory(device: DeviceProfile | None) -> dict:
    probes = {"gpu": memory.gpu_memory()}
    if device is None or device.kind == "jetson":
        probes["unified"] = memory.jetson_memory(timeout_s=2.0)
    return {name: {"available": p.available, "used_bytes": p.used_bytes, "total_bytes": p.total_bytes,
                   "source": p.source, "reason": p.reason} for name, p in probes.items()}


def _llm_key(manifest: dict) -> str:
    """The LLM graphs' manifest entries and file hashes: bundles with the same key can share one loaded LLM."""
    from edgeprune.runtime.llm import llm_files

    files = set(llm_files(manifest))   # the decoder, its data and the embedding table (or embed graph)
    return json.dumps([{key: manifest[key] for key in llm_keys()},
                       {k: v for k, v in manifest[Keys.FILES_SHA256].items() if k in files}], sort_keys=True)


def _load(bundle_dirs: list[Path], providers, threads) -> list:
    """Pipelines of the bundles; those whose LLM graphs are the same files share one loaded LLM."""
    from edgeprune.runtime.bundle import read_manifest
    from edgeprune.runtime.pipeline import Pipeline

    pipelines, shared = [], {}
    for path in bundle_dirs:
        key = _llm_key(read_manifest(path))
        pipelines.append(Pipeline(path, providers=providers, threads=threads, llm=shared.get(key)))
        shared.setdefault(key, pipelines[-1].llm)
    return pipelines


def _pruner_profile(pipeline, images: list, threads):
    """A profiled session of the pipeline's (default) vision graph, fed the same images."""
    from dataclasses import replace

    from edgeprune.profiles.pruner_cost import PrunerProfile
    from edgeprune.runtime.preprocess import preprocess

    bundle = pipeline.bundle
    pixels = preprocess(images, replace(bundle.preprocess, size=tuple(pipeline.buckets[0]["size"])))
    return PrunerProfile(bundle, pixels.astype(pipeline.vision.pixel_dtype), providers=pipeline.providers,
                         threads=threads)


def profile_bundles(bundle_dirs: list[str | Path], *, image=None, prompt: str = DEFAULT_PROMPT, runs: int = 5,
                    warmup: int = 1, new_tokens: int = 16, batch: int = 1, providers: list[str] | None = None,
                    threads: int | None = None, device: DeviceProfile | None = None, progress=None) -> list[dict]:
    """Warm up each bundle, then time `runs` rounds of one request per bundle, round-robin. Returns one
    report per bundle (stable keys, REPORT_SCHEMA); `samples_s` holds the per-round values, in round
    order, so two reports can be compared round by round (`compare`)."""
    if runs < 1 or warmup < 0 or new_tokens < 1 or batch < 1:
        from edgeprune.errors import EdgepruneError

        raise EdgepruneError(f"runs={runs}, warmup={warmup}, new_tokens={new_tokens}, batch={batch}: expected "
                             "runs >= 1, warmup >= 0, new_tokens >= 1, batch >= 1")
    bundle_dirs = [Path(p) for p in bundle_dirs]
    rss_before_load = memory.rss_bytes()
    start = time.perf_counter()
    pipelines = _load(bundle_dirs, providers or (list(device.providers) if device else None), threads)
    load_s = (time.perf_counter() - start) / len(pipelines)
    images = [image or DEFAULT_IMAGE] * batch

    def request(pipe):
        return lambda: _run_once(pipe, images, prompt, new_tokens)

    with memory.RssSampler() as sampler:
        samples = run_interleaved([request(p) for p in pipelines], runs, warmup, progress)
    # then the pruner's cost, in profiled sessions loaded only now: the peak RSS above is the pipelines' own
    probes = [_pruner_profile(pipe, images, threads) for pipe in pipelines]
    run_interleaved([probe.run for probe in probes], runs, warmup)
    settings = {"runs": runs, "warmup": warmup, "new_tokens": new_tokens, "batch": batch, "prompt": prompt,
                "image": str(image or DEFAULT_IMAGE), "interleaved_with": len(pipelines) - 1}
    return [_report(path, pipe, done, probe.finish(skip=warmup), settings, device, threads, load_s, rss_before_load,
                    sampler.peak) for path, pipe, done, probe in zip(bundle_dirs, pipelines, samples, probes)]


def profile_bundle(bundle_dir: str | Path, **kw) -> dict:
    """One bundle: `profile_bundles([bundle_dir], **kw)[0]`."""
    return profile_bundles([bundle_dir], **kw)[0]


def _report(bundle_dir: Path, pipeline, runs_done: list[_Run], nodes: list[dict], settings: dict, device, threads,
            load_s: float, rss_before_load: int, peak_rss: int) -> dict:
    manifest = pipeline.bundle.manifest
    last = runs_done[-1].result
    samples = {name: [r.result.timings[name] for r in runs_done] for name in STAGE_KEYS}
    samples["ttft"] = [sum(r.result.timings[s] for s in TTFT_STAGES) for r in runs_done]
    samples["total"] = [r.total_s for r in runs_done]
    steps = [s for r in runs_done for s in r.result.decode_steps]
    stage_sum = [sum(r.result.timings[s] for s in STAGE_KEYS) for r in runs_done]
    generated = len(last.ids[0]) if last.ids else 0
    kv_tokens = last.num_prompt_tokens + max(len(last.decode_steps), 0)  # tokens whose K/V the cache holds
    loaded = settings["interleaved_with"] + 1
    plan = StagePlan.from_manifest(manifest)
    groups = kv_groups(manifest, plan, last.num_prompt_tokens, len(last.decode_steps), settings["batch"])
    return {
        "schema": REPORT_SCHEMA,
        "edgeprune_version": __version__,
        "bundle": str(bundle_dir),
        "method": manifest[Keys.PRUNER_METHOD],
        "label": pruner_label(manifest),         # "autoselect (untrained)" for the random-scorer baseline
        "keep": int(manifest[Keys.PRUNER_KEEP]),
        "num_image_tokens": int(manifest[Keys.MODEL_NUM_IMAGE_TOKENS]),
        "positions": manifest[Keys.POSITIONS_MODE],
        "model_family": manifest[Keys.MODEL_FAMILY],
        "device_profile": device.to_dict() if device else None,
        "host": {"machine": platform.machine(), "processor": platform.processor(), "python": platform.python_version(),
                 "providers": list(pipeline.providers), "vision_on": pipeline.vision.device,
                 "llm_on": pipeline.llm.device, "threads": threads, "load_average": _load_average()},
        "settings": settings,
        "load_s": load_s,
        "latency_s": {
            **{name: summarize(values) for name, values in samples.items()},
            "decode_per_token": summarize(steps),
            "stages_sum": summarize(stage_sum),
        },
        "samples_s": samples,
        "pruner": pruner_summary(nodes),
        "tokens_per_s": (1.0 / statistics.median(steps)) if steps else None,
        "tokens": {"prompt": last.num_prompt_tokens, "generated": generated, "text_tokens":
                   last.num_prompt_tokens - int(manifest[Keys.PRUNER_KEEP])},
        "memory": {
            "peak_rss_bytes": peak_rss,
            # one process holds every interleaved bundle (their LLM shared when it is the same graphs)
            "peak_rss_scope": "this bundle" if loaded == 1 else f"process with {loaded} bundles loaded",
            "rss_before_load_bytes": rss_before_load,
            "weights_bytes": weights_bytes(bundle_dir, manifest),
            "kv_cache_bytes": int(last.kv_bytes),
            "kv_cache_bytes_expected": sum(g["bytes"] for g in groups),
            "kv_cache_tokens": kv_tokens,
            "kv_cache_groups": groups,
            "device": _device_memory(device),
        },
        "llm_stage": stage_report(manifest, plan, last.num_prompt_tokens) if plan else None,
        "stage_keep": [k.tolist() for k in last.stage_keep],
        "text": last.texts[0],
        "extras": {k: np.asarray(v).tolist() for k, v in last.extras.items()},
    }


def pruner_summary(nodes: list[dict]) -> dict:
    """The pruner's time per run and its share of the vision graph's node time (paired per run).

    Its noise flag is that of the ratio graph / (graph - pruner), how much the pruner slows the graph,
    so it follows the same rule as every other ratio: a 0.4 % pruner measured 0.3-0.5 % is a supported
    claim (ratio 1.003-1.005), a 2 % one measured 1-30 % is not."""
    if not nodes or not any(n["pruner_nodes"] for n in nodes):
        return {"available": False, "reason": "no node of the vision graph carries the pruner's scope (no pruner "
                "nodes, or the provider ran the graph as one fused node)", "runs": len(nodes)}
    pruner = [n["pruner_s"] for n in nodes]
    graph = [n["graph_s"] for n in nodes]
    return {"available": True, "time_s": summarize(pruner), "graph_s": summarize(graph),
            "share": paired_ratio(pruner, graph),
            "slowdown": paired_ratio(graph, [g - p for g, p in zip(graph, pruner)]),
            "inferred_s": summarize([n["inferred_s"] for n in nodes]),
            "nodes": nodes[0]["pruner_nodes"], "runs": len(nodes)}


def compare(report: dict, reference: dict, stages=("vision", "prefill", "ttft", "total")) -> dict:
    """reference / report per round for each stage (a speedup when the reference is the slower one),
    with spread and the noise flag (profiles/interleave.py). Both must come from one profile_bundles call."""
    return {stage: paired_ratio(reference["samples_s"][stage], report["samples_s"][stage]) for stage in stages}


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def soak(bundle_dir: str | Path, requests: int, *, image=None, prompt: str = DEFAULT_PROMPT, new_tokens: int = 8,
         providers: list[str] | None = None, threads: int | None = None, progress=None) -> dict:
    """`requests` back-to-back requests: RSS growth and latency drift between the first and last tenth.

    RSS is compared after the first tenth (allocators and ORT arenas have grown by then) with the end."""
    from edgeprune.runtime.checks import check_count
    from edgeprune.runtime.pipeline import Pipeline

    check_count("requests", requests)
    pipeline = Pipeline(bundle_dir, providers=providers, threads=threads)
    tenth = max(1, requests // 10)
    latencies, rss = [], []
    for i in range(requests):
        latencies.append(_run_once(pipeline, [image or DEFAULT_IMAGE], prompt, new_tokens).total_s)
        rss.append(memory.rss_bytes())
        if progress:
            progress()
    baseline, final = rss[min(tenth, requests) - 1], rss[-1]
    first, last = statistics.median(latencies[:tenth]), statistics.median(latencies[-tenth:])
    return {"requests": requests, "rss_baseline_bytes": baseline, "rss_final_bytes": final,
            "rss_growth_pct": 100.0 * (final - baseline) / baseline, "latency_first_tenth_s": first,
            "latency_last_tenth_s": last, "latency_drift_pct": 100.0 * (last - first) / first,
            "rss_goal_pct": 5.0}
