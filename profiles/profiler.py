"""Per-stage latency and memory of one bundle on this device (`edgeprune profile`).

Stages come from the runtime's own timers (runtime.pipeline.STAGES); every run is also timed as a
whole, so the report shows how much the stages leave unexplained. TTFT = preprocess + vision +
embed + prefill: the first new token comes out of the prefill. Torch-free.
"""
from __future__ import annotations

import logging
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeprune import __version__
from edgeprune.profiles import memory
from edgeprune.profiles.device import DeviceProfile
from edgeprune.runtime.format import Graph, Keys, external_data

__all__ = ["profile_bundle", "soak", "summarize", "kv_bytes_expected", "weights_bytes", "DEFAULT_PROMPT",
           "REPORT_SCHEMA"]

log = logging.getLogger(__name__)

REPORT_SCHEMA = 1
DEFAULT_PROMPT = "Describe the image in one sentence."
DEFAULT_IMAGE = Path(__file__).resolve().parent / "chelsea.png"
STAGE_KEYS = ("preprocess", "vision", "embed", "prefill", "decode")
DTYPE_BYTES = {"float32": 4, "float16": 2}


def summarize(values: list[float]) -> dict:
    """Median, p90, min, max (seconds) of repeated measurements; the spread is max - min."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"median": None, "p90": None, "min": None, "max": None, "n": 0}
    return {"median": float(np.median(arr)), "p90": float(np.percentile(arr, 90)), "min": float(arr.min()),
            "max": float(arr.max()), "n": int(arr.size)}


def kv_bytes_expected(manifest: dict, batch: int, tokens: int) -> int:
    """layers x 2 (K and V) x kv_heads x head_dim x tokens x dtype size x batch."""
    return (manifest[Keys.LLM_NUM_LAYERS] * 2 * manifest[Keys.LLM_NUM_KV_HEADS] * manifest[Keys.LLM_HEAD_DIM] * tokens
            * DTYPE_BYTES[manifest[Keys.LLM_DTYPE]] * batch)


def weights_bytes(bundle_dir: Path, manifest: dict) -> dict:
    """Bytes on disk of each graph with its external data ('vision', 'embed', 'decoder')."""
    graphs = {"vision": manifest[Keys.VISION_GRAPH][Graph.FILE],
              "embed": manifest[Keys.LLM_EMBED_GRAPH][Graph.FILE],
              "decoder": manifest[Keys.LLM_DECODER_GRAPH][Graph.FILE]}
    out = {}
    for name, rel in graphs.items():
        path = bundle_dir / rel
        data = path.with_name(external_data(path.name))
        out[name] = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
    return out


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


def profile_bundle(bundle_dir: str | Path, *, image=None, prompt: str = DEFAULT_PROMPT, runs: int = 5,
                   warmup: int = 1, new_tokens: int = 16, batch: int = 1, providers: list[str] | None = None,
                   threads: int | None = None, device: DeviceProfile | None = None, progress=None) -> dict:
    """Warm up, then time `runs` requests. Returns the report dict (stable keys, REPORT_SCHEMA)."""
    from edgeprune.runtime.pipeline import Pipeline

    if runs < 1 or warmup < 0 or new_tokens < 1 or batch < 1:
        from edgeprune.errors import EdgepruneError

        raise EdgepruneError(f"runs={runs}, warmup={warmup}, new_tokens={new_tokens}, batch={batch}: expected "
                             "runs >= 1, warmup >= 0, new_tokens >= 1, batch >= 1")
    bundle_dir = Path(bundle_dir)
    rss_before_load = memory.rss_bytes()
    start = time.perf_counter()
    pipeline = Pipeline(bundle_dir, providers=providers or (list(device.providers) if device else None),
                        threads=threads)
    load_s = time.perf_counter() - start
    manifest = pipeline.bundle.manifest
    images = [image or DEFAULT_IMAGE] * batch
    for _ in range(warmup):
        _run_once(pipeline, images, prompt, new_tokens)
    runs_done: list[_Run] = []
    with memory.RssSampler() as sampler:
        for _ in range(runs):
            runs_done.append(_run_once(pipeline, images, prompt, new_tokens))
            if progress:
                progress()
    last = runs_done[-1].result
    stage = {name: summarize([r.result.timings[name] for r in runs_done]) for name in STAGE_KEYS}
    ttft = [sum(r.result.timings[s] for s in ("preprocess", "vision", "embed", "prefill")) for r in runs_done]
    steps = [s for r in runs_done for s in r.result.decode_steps]
    totals = [r.total_s for r in runs_done]
    stage_sum = [sum(r.result.timings[s] for s in STAGE_KEYS) for r in runs_done]
    generated = len(last.ids[0]) if last.ids else 0
    kv_tokens = last.num_prompt_tokens + max(len(last.decode_steps), 0)  # tokens whose K/V the cache holds
    return {
        "schema": REPORT_SCHEMA,
        "edgeprune_version": __version__,
        "bundle": str(bundle_dir),
        "method": manifest[Keys.PRUNER_METHOD],
        "keep": int(manifest[Keys.PRUNER_KEEP]),
        "num_image_tokens": int(manifest[Keys.MODEL_NUM_IMAGE_TOKENS]),
        "positions": manifest[Keys.POSITIONS_MODE],
        "model_family": manifest[Keys.MODEL_FAMILY],
        "device_profile": device.to_dict() if device else None,
        "host": {"machine": platform.machine(), "processor": platform.processor(), "python": platform.python_version(),
                 "providers": list(pipeline.providers), "vision_on": pipeline.vision.device,
                 "llm_on": pipeline.llm.device, "threads": threads},
        "settings": {"runs": runs, "warmup": warmup, "new_tokens": new_tokens, "batch": batch, "prompt": prompt,
                     "image": str(image or DEFAULT_IMAGE)},
        "load_s": load_s,
        "latency_s": {
            **stage,
            "ttft": summarize(ttft),
            "decode_per_token": summarize(steps),
            "total": summarize(totals),
            "stages_sum": summarize(stage_sum),
        },
        "tokens_per_s": (1.0 / statistics.median(steps)) if steps else None,
        "tokens": {"prompt": last.num_prompt_tokens, "generated": generated, "text_tokens":
                   last.num_prompt_tokens - int(manifest[Keys.PRUNER_KEEP])},
        "memory": {
            "peak_rss_bytes": sampler.peak,
            "rss_before_load_bytes": rss_before_load,
            "weights_bytes": weights_bytes(bundle_dir, manifest),
            "kv_cache_bytes": int(last.kv_bytes),
            "kv_cache_bytes_expected": kv_bytes_expected(manifest, batch, kv_tokens),
            "kv_cache_tokens": kv_tokens,
            "device": _device_memory(device),
        },
        "text": last.texts[0],
        "extras": {k: np.asarray(v).tolist() for k, v in last.extras.items()},
    }


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
