"""K planner: the largest image-token budget K that fits a device's memory and a TTFT target.

Memory is predicted from the model's shapes (weights + activations + KV cache for the context);
latency comes from a measured sweep when one is given (interpolated between measured K), otherwise
from a two-point calibration of the LLM prefill on this machine (a line in the token count). Every
figure in the plan says whether it was measured or estimated. Torch-free.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeprune.errors import EdgepruneError
from edgeprune.runtime.format import external_data
from edgeprune.profiles.device import DeviceProfile

__all__ = ["ModelFacts", "facts_from_bundle", "predict_memory", "LatencyModel", "plan", "CANDIDATE_KEEPS"]

log = logging.getLogger(__name__)

CANDIDATE_KEEPS = (2880, 1152, 576, 384, 256, 192, 144, 128, 96, 64, 48, 32, 16, 8)
PRECISION_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "fp8": 1}
QUANTIZED = ("int8", "int4")   # LLM precisions that keep their stored size on every device (MatMulNBits)


@dataclass(frozen=True)
class ModelFacts:
    name: str
    num_image_tokens: int        # N
    vision_params: int
    llm_params: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    vision_hidden: int
    vision_layers: int
    vision_tokens: int           # tokens one encoder pass attends over (N, + [CLS] where present)
    vision_views: int = 1        # encoder passes per image (LLaVA-NeXT: base view + crops)
    llm_weight_bits: float | None = None   # a quantized LLM's stored bits per parameter (packed weights + scales);
    llm_precision: str | None = None       # None: the LLM's weights are counted in the device precision


def facts_from_bundle(bundle_dir: Path) -> ModelFacts:
    """Shapes from the manifest (BundleError naming the key for an older bundle that lacks one); parameter
    counts from the graphs' initializers."""
    import onnx

    from edgeprune.runtime.bundle import load_bundle
    from edgeprune.runtime.format import Graph, Keys, llm_precision

    bundle = load_bundle(bundle_dir, verify=False)
    m = bundle.manifest

    def count(key) -> int:
        model = onnx.load(str(bundle.file(m[key][Graph.FILE])), load_external_data=False)
        return sum(int(np.prod(i.dims)) for i in model.graph.initializer)

    # the torch model's count where recorded (a quantized decoder's initializers are packed blocks; a tied
    # table is the LM head's weight), else the graphs' (bundles that predate llm.num_parameters)
    llm_params = m[Keys.LLM_NUM_PARAMETERS] or count(Keys.LLM_DECODER_GRAPH) + (
        count(Keys.LLM_EMBED_GRAPH) if m[Keys.LLM_EMBED_GRAPH] is not None else 0)
    # A quantized LLM (--llm-precision int8/int4) runs at its own precision whatever the device's: its weights
    # take what the bundle stores (packed blocks, scales, zero points), not llm_params at the device's bytes.
    precision = llm_precision(m)
    weight_bits = None
    if precision in QUANTIZED:
        stored = sum(path.stat().st_size for key in (Keys.LLM_DECODER_GRAPH, Keys.LLM_EMBED_GRAPH) if m[key]
                     for path in _with_external_data(bundle.file(m[key][Graph.FILE])))
        weight_bits = 8 * stored / llm_params
    return ModelFacts(name=str(bundle_dir), num_image_tokens=bundle.num_image_tokens,
                      vision_params=count(Keys.VISION_GRAPH), llm_params=llm_params,
                      num_layers=m[Keys.LLM_NUM_LAYERS], num_heads=bundle.known(Keys.LLM_NUM_HEADS),
                      num_kv_heads=m[Keys.LLM_NUM_KV_HEADS], head_dim=m[Keys.LLM_HEAD_DIM],
                      hidden_size=m[Keys.LLM_HIDDEN_SIZE], intermediate_size=bundle.known(Keys.LLM_INTERMEDIATE_SIZE),
                      vocab_size=m[Keys.LLM_VOCAB_SIZE], vision_hidden=bundle.known(Keys.VISION_HIDDEN_SIZE),
                      vision_layers=bundle.known(Keys.VISION_NUM_LAYERS),
                      vision_tokens=bundle.known(Keys.VISION_TOKENS_PER_VIEW), vision_views=bundle.known(Keys.VISION_VIEWS),
                      llm_weight_bits=weight_bits, llm_precision=precision if weight_bits else None)


def _with_external_data(graph: Path) -> list[Path]:
    """The graph file and its external data file (export writes FILE.data), where present."""
    data = graph.with_name(external_data(graph.name))
    return [graph, data] if data.is_file() else [graph]


def predict_memory(facts: ModelFacts, keep: int, context: int, precision: str, batch: int = 1) -> dict:
    """Bytes: weights, KV cache for K + context tokens, and the activation peak (the larger of the
    vision encoder's and the LLM prefill's), assuming unfused attention scores (an upper bound)."""
    b = PRECISION_BYTES[precision]
    seq = keep + context
    llm_bytes = facts.llm_params * (b if facts.llm_weight_bits is None else facts.llm_weight_bits / 8)
    weights = int(facts.vision_params * b + llm_bytes)
    kv = facts.num_layers * 2 * facts.num_kv_heads * facts.head_dim * seq * b * batch
    llm_act = batch * (seq * (4 * facts.hidden_size + 2 * facts.intermediate_size) * b
                       + facts.num_heads * seq * seq * b + facts.vocab_size * 4)
    vis_act = batch * facts.vision_views * (facts.vision_tokens * 8 * facts.vision_hidden * b
                                            + max(1, facts.vision_hidden // 64) * facts.vision_tokens ** 2 * b)
    activations = max(llm_act, vis_act)
    return {"weights": weights, "kv_cache": kv, "activations": activations, "total": weights + kv + activations}


class LatencyModel:
    """TTFT(K) for one method: measured points (linear interpolation between them, linear
    extrapolation beyond) or a calibrated line a + b * tokens."""

    def __init__(self, keeps: list[int], ttft_s: list[float], source: str):
        order = np.argsort(keeps)
        self.keeps = np.asarray(keeps, dtype=np.float64)[order]
        self.ttft = np.asarray(ttft_s, dtype=np.float64)[order]
        self.source = source

    def __call__(self, keep: int) -> tuple[float, str]:
        if keep in self.keeps:
            return float(self.ttft[list(self.keeps).index(keep)]), "measured"
        if len(self.keeps) == 1:
            return float(self.ttft[0]), "estimated (single point)"
        if self.keeps[0] <= keep <= self.keeps[-1]:
            return float(np.interp(keep, self.keeps, self.ttft)), "estimated (interpolated)"
        slope, icpt = np.polyfit(self.keeps, self.ttft, 1)
        return float(max(0.0, icpt + slope * keep)), "estimated (extrapolated)"


def latency_from_sweep(path: Path) -> dict[str, LatencyModel]:
    try:
        rows = json.loads(Path(path).read_text())["rows"]
    except (OSError, ValueError, KeyError) as err:
        raise EdgepruneError(f"--sweep {path}: not a sweep.json written by `edgeprune sweep` ({err})") from err
    models = {}
    for method in sorted({r["method"] for r in rows}):
        rs = [r for r in rows if r["method"] == method]
        models[method] = LatencyModel([r["keep"] for r in rs], [r["ttft_ms"] / 1e3 for r in rs], f"sweep {path}")
    return models


def calibrate_prefill(bundle_dir: Path, text_tokens: int, threads: int | None = None, runs: int = 3) -> LatencyModel:
    """Time the bundle's LLM prefill (random embeddings) at K = 64 and K = N, plus its vision graph once.
    TTFT(K) ~ vision + prefill(K + M), the prefill a line through the two measured lengths."""
    from edgeprune.runtime.bundle import load_bundle
    from edgeprune.runtime.llm import OrtLLM

    bundle = load_bundle(bundle_dir)
    llm = OrtLLM(bundle.path, bundle.manifest, threads=threads)
    rng = np.random.default_rng(0)
    n = bundle.num_image_tokens
    keeps = sorted({min(64, n), n})
    times = []
    for k in keeps:
        length = k + text_tokens
        embeds = (rng.standard_normal((1, length, llm.hidden_size)) * 0.02).astype(llm.dtype)
        pos = np.arange(length, dtype=np.int64)[None]
        samples = []
        for _ in range(runs + 1):
            start = time.perf_counter()
            llm.step(embeds, pos, np.ones((1, length), np.int64), None)
            samples.append(time.perf_counter() - start)
        times.append(float(np.median(samples[1:])))
    return LatencyModel(keeps, times, f"prefill calibration of {bundle_dir} on this machine (vision excluded)")


def plan(facts: ModelFacts, device: DeviceProfile, *, context: int, ttft_ms: float | None = None,
         latency: dict[str, LatencyModel] | None = None, batch: int = 1, keeps=None) -> dict:
    """Every candidate K with its memory and (if known) TTFT; the recommendation is the largest K that
    fits both the memory budget and the TTFT target, with the fastest method there."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise EdgepruneError(f"--context {context}: expected the text tokens of a request (prompt + answer), >= 1")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise EdgepruneError(f"--batch {batch}: expected the images of a request, an integer >= 1")
    if ttft_ms is not None and not (isinstance(ttft_ms, (int, float)) and math.isfinite(ttft_ms) and ttft_ms > 0):
        raise EdgepruneError(f"--ttft-ms {ttft_ms}: expected a time-to-first-token target in ms, a finite number > 0")
    n = facts.num_image_tokens
    candidates = sorted({k for k in (keeps or CANDIDATE_KEEPS) if 1 <= k <= n} | {n}, reverse=True)
    budget = device.memory_available_bytes
    rows = []
    for k in candidates:
        mem = predict_memory(facts, k, context, device.precision, batch)
        row = {"keep": k, "memory": mem, "fits_memory": mem["total"] <= budget, "ttft_ms": {}, "ttft_source": {}}
        for method, model in (latency or {}).items():
            t, source = model(k)
            row["ttft_ms"][method] = t * 1e3
            row["ttft_source"][method] = source
        rows.append(row)

    def meets(row) -> tuple[bool, str | None]:
        if not row["fits_memory"]:
            return False, None
        if ttft_ms is None or not row["ttft_ms"]:
            return True, min(row["ttft_ms"], key=row["ttft_ms"].get) if row["ttft_ms"] else None
        ok = {m: t for m, t in row["ttft_ms"].items() if t <= ttft_ms}
        return (bool(ok), min(ok, key=ok.get) if ok else None)

    choice = next(((r, m) for r in rows for ok, m in [meets(r)] if ok), None)
    notes = ["memory: estimated from the model's shapes (weights in the device precision, KV cache for K + context "
             "tokens, activation peak with unfused attention: an upper bound)"]
    if facts.llm_weight_bits is not None:
        notes.append(f"LLM weights: {facts.llm_precision}, as the bundle stores them ({facts.llm_weight_bits:.2f} bits "
                     f"per parameter with scales), not in the device precision")
    if ttft_ms is not None and not latency:
        notes.append("TTFT target given but no latency source: pass --sweep sweep.json (measured on the device) or "
                     "--calibrate BUNDLE")
    for method, model in (latency or {}).items():
        notes.append(f"TTFT for {method}: {model.source}")
    return {"device": device.name, "memory_budget_bytes": budget, "context": context, "batch": batch,
            "ttft_target_ms": ttft_ms, "num_image_tokens": n, "rows": rows,
            "recommendation": None if choice is None else {"keep": choice[0]["keep"], "method": choice[1]},
            "notes": notes}
