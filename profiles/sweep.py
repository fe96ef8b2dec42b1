"""Sweep methods x budgets: export (or reuse) a bundle per point, profile them interleaved, one table + plots.

The unpruned bundle (K = N) is exported once and is the baseline of every row. All points are timed
in one interleaved profile (profiles/interleave.py: warm-up each, then round-robin rounds), and every
ratio against the baseline is taken round by round: prefill speedup = prefill(N) / prefill(K) next to
the token-count limit (N + M) / (K + M), the speedup the LLM's MACs predict (profiles/flops.py), TTFT
and vision-graph speedups the same way. The pruner's cost is its own nodes' share of its vision graph
in ONNX Runtime's node profile (profiles/pruner_cost.py), not a difference of two bundles. A row whose
ratios spread more than NOISE_LIMIT_PCT over the rounds is marked NOISY. The LLM graphs are the same
for every pre-LLM point, so they are exported once and reused (hard-linked where possible) by the other
bundles, and loaded once. In-LLM points (--llm-methods x --llm-keeps: all N image tokens enter the LLM,
one stage keeps K2 from `llm_layer` on, default the method's first layer) have their own prefill graph.
"""
from __future__ import annotations

import logging
from pathlib import Path

from edgeprune.errors import EdgepruneError
from edgeprune.profiles.interleave import NOISE_LIMIT_PCT, NOISY, paired_ratio
from edgeprune.profiles.profiler import profile_bundles
from edgeprune.profiles.report import sweep_markdown, sweep_plots, write_atomic, write_json
from edgeprune.profiles.flops import LLM_SHAPES
from edgeprune.runtime.bundle import read_manifest
from edgeprune.runtime.format import Keys, Stage

__all__ = ["run_sweep", "sweep_rows", "bundle_name"]

log = logging.getLogger(__name__)


def bundle_name(method: str | None, keep: int, cfg: dict | None = None, llm: bool = False) -> str:
    """Folder name of a point; options given with --cfg are part of it (e.g. autoselect-scorer-random-k64); an
    in-LLM point is llm-<method>-k<K2>."""
    if llm:
        return f"llm-{method}-k{keep}"
    if method is None:
        return f"full-k{keep}"
    options = "".join(f"-{k}-{v}" for k, v in sorted((cfg or {}).items()))
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{method}{options}-k{keep}")


def _matches(bundle: Path, model: str, method: str | None, keep: int, cfg: dict | None = None,
             llm: bool = False) -> bool:
    """An existing bundle of this model, method (any method for the unpruned one), K (K2 for an in-LLM point,
    whose vision graph is unpruned) and --cfg options."""
    from edgeprune.errors import BundleError

    try:
        manifest = read_manifest(bundle)
    except BundleError:
        return False
    if manifest[Keys.MODEL_SOURCE] != model:
        return False
    if llm:
        stages = manifest[Keys.LLM_STAGE_STAGES]
        return manifest[Keys.LLM_STAGE_METHOD] == method and bool(stages) and stages[-1][Stage.KEEP_OUT] == keep
    config = manifest[Keys.PRUNER_CONFIG]
    return (manifest[Keys.PRUNER_KEEP] == keep and manifest[Keys.LLM_STAGE_METHOD] is None
            and method in (None, manifest[Keys.PRUNER_METHOD])
            and (method is None or all(config.get(k) == v for k, v in (cfg or {}).items())))


def sweep_rows(reports: list[dict], baseline: dict, limit_pct: float = NOISE_LIMIT_PCT) -> list[dict]:
    """Table rows from interleaved profile reports, relative to the unpruned `baseline` report (paired per round)."""
    n = baseline["num_image_tokens"]
    m = baseline["tokens"]["text_tokens"]
    base, base_kv = baseline["samples_s"], baseline["memory"]["kv_cache_bytes"]
    rows = []
    for r in reports:
        lat, k, own = r["latency_s"], r["keep"], r["samples_s"]
        speedup = {stage: paired_ratio(base[stage], own[stage], limit_pct) for stage in ("prefill", "ttft", "vision")}
        pruner = r["pruner"]
        share = pruner["share"] if pruner["available"] and k < n else None
        noisy = any(c["noisy"] for c in speedup.values()) or bool(share and pruner["slowdown"]["noisy"])
        stage = r.get("llm_stage")
        if stage:   # an in-LLM point: K2 is what the later layers see
            k = stage["stages"][-1]["keep_out"]
        rows.append({
            "method": r["sweep_method"], "keep": k, "num_image_tokens": n,
            "layer_average": stage["layer_average"] if stage else float(k),
            "speedup_predicted": _predicted(r, baseline),
            "ttft_ms": lat["ttft"]["median"] * 1e3, "ttft_min_ms": lat["ttft"]["min"] * 1e3,
            "ttft_spread_pct": lat["ttft"]["spread_pct"],
            "prefill_ms": lat["prefill"]["median"] * 1e3, "prefill_min_ms": lat["prefill"]["min"] * 1e3,
            "vision_ms": lat["vision"]["median"] * 1e3, "vision_spread_pct": lat["vision"]["spread_pct"],
            "pruner_ms": pruner["time_s"]["median"] * 1e3 if share else None,
            # the pruner's nodes as % of its own vision graph's node time, per run (ORT node profile)
            "pruner_overhead_pct": 100.0 * share["median"] if share else None,
            "pruner_overhead_range_pct": [100.0 * share["min"], 100.0 * share["max"]] if share else None,
            "decode_ms_per_token": (lat["decode_per_token"]["median"] or 0.0) * 1e3,
            "kv_bytes": r["memory"]["kv_cache_bytes"], "kv_ratio": r["memory"]["kv_cache_bytes"] / base_kv,
            **{f"{stage}_speedup{suffix}": value for stage, c in speedup.items() for suffix, value in
               (("", c["median"]), ("_spread_pct", c["spread_pct"]), ("_range", [c["min"], c["max"]]))},
            "token_limit": (n + m) / (k + m),
            "noisy": noisy, "note": "reference" if k == n else NOISY if noisy else "",
        })
    return rows


def _predicted(report: dict, baseline: dict) -> float | None:
    """The prefill speedup the LLM's MACs predict for this point against the unpruned baseline."""
    from edgeprune.profiles.flops import prefill_macs, shapes_known

    shapes = report.get("llm_shapes") or {}
    if not shapes or not shapes_known(shapes):
        return None
    t = shapes[Keys.LLM_NUM_LAYERS]
    stage = report.get("llm_stage")
    tokens = stage["prefill_tokens_per_layer"] if stage else [report["tokens"]["prompt"]] * t
    return prefill_macs(shapes, [baseline["tokens"]["prompt"]] * t) / prefill_macs(shapes, tokens)


def run_sweep(model: str, methods: list[str], keeps: list[int], out: Path, *, runs: int = 3, warmup: int = 1,
              new_tokens: int = 8, image=None, prompt: str | None = None, threads: int | None = None,
              positions: str | None = None, progress=None, cfg: dict | None = None, llm_methods: list[str] = (),
              llm_keeps: list[int] = (), llm_layer: int | None = None) -> dict:
    """Export/reuse bundles under out/bundles, profile them interleaved, write sweep.json, sweep.md and the plots.

    progress(label, total) is called after each bundle is ready and after each timed run. `cfg`: pruner
    options, each given to the methods that accept it (e.g. scorer=random)."""
    from edgeprune.export.bundle import export_bundle
    from edgeprune.inllm import available as stage_methods
    from edgeprune.models import load
    from edgeprune.pruners import options_by_method

    adapter = load(model)
    n = adapter.num_image_tokens
    bad = [k for k in keeps if not 1 <= k <= n]
    if bad:
        raise EdgepruneError(f"--keep {bad}: expected 1 <= K <= N={n}")
    bad = [k for k in llm_keeps if not 1 <= k <= n]
    if bad:
        raise EdgepruneError(f"--llm-keeps {bad}: expected 1 <= K2 <= N={n}")
    bundles = out / "bundles"
    options = options_by_method(methods, cfg or {})
    points = [(None, n, False)] + [(m, k, False) for m in methods for k in sorted(set(keeps), reverse=True) if k < n]
    points += [(m, k, True) for m in llm_methods for k in sorted(set(llm_keeps), reverse=True) if k < n]
    total = len(points) + runs * len(points)
    paths = []
    for method, k, in_llm in points:
        base = method if method and not in_llm else (methods[0] if methods else "uniform")
        opts = {} if in_llm else options.get(base, {})
        path = bundles / bundle_name(method, k, opts, llm=in_llm)
        if in_llm and not _matches(path, model, method, k, llm=True):
            export_bundle(adapter, path, method=base, keep=None, positions=positions,
                          force=True, source=model, validate=False, llm_method=method, llm_keep=[k],
                          llm_layer=[llm_layer or stage_methods()[method].default_layers[0]])
        elif not in_llm and not _matches(path, model, method, k, opts):
            # K = N: every method returns its input, so any method exports the unpruned graph
            export_bundle(adapter, path, method=base, keep=k, cfg=opts, positions=positions,
                          force=True, source=model, validate=False, reuse_llm_from=paths[0] if paths else None)
        paths.append(path)
        if progress:
            progress(f"exported {method or 'full'} K={k}", total)
    del adapter   # the torch model is not needed while timing: free its memory
    kw = {"image": image, "threads": threads, "runs": runs, "warmup": warmup, "new_tokens": new_tokens,
          "progress": (lambda: progress("timing, round-robin", total)) if progress else None}
    if prompt:
        kw["prompt"] = prompt
    reports = profile_bundles(paths, **kw)
    labels: dict = {}   # method -> the name reports show, e.g. "autoselect (untrained)"
    for report, path, (method, _, in_llm) in zip(reports, paths, points):
        report["sweep_method"] = f"{method} (in-LLM)" if in_llm else (report["label"] if method else "full")
        if not in_llm:
            labels[method] = report["sweep_method"]
        manifest = read_manifest(path)   # the LLM shapes the predicted speedup needs (profiles/flops.py)
        report["llm_shapes"] = {str(key): manifest[key] for key in (*LLM_SHAPES, Keys.LLM_NUM_LAYERS)}
    baseline = reports[0]
    rows = sweep_rows(reports, baseline)
    # K = N is the same graph for every method: show it once per method so each curve reaches N.
    full = next(r for r in rows if r["method"] == "full")
    rows = [r for r in rows if r["method"] != "full"] + [dict(full, method=labels.get(m, m)) for m in methods]
    rows += [dict(full, method=f"{m} (in-LLM)") for m in llm_methods]
    meta = {"model": model, "num_image_tokens": n, "text_tokens": baseline["tokens"]["text_tokens"], "runs": runs,
            "warmup": warmup, "new_tokens": new_tokens, "methods": [labels.get(m, m) for m in methods],
            "cfg": cfg or {},
            "keeps": sorted(set(keeps) | {n}, reverse=True),
            "llm_methods": list(llm_methods), "llm_keeps": sorted(set(llm_keeps), reverse=True),
            "interleaved": True, "noise_limit_pct": NOISE_LIMIT_PCT, "load_average": baseline["host"]["load_average"]}
    rows.sort(key=lambda r: (r["method"], -r["keep"]))
    result = {"schema": 2, "meta": meta, "rows": rows, "reports": reports}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sweep.json", result)
    text = sweep_markdown(rows, meta)
    write_atomic(out / "sweep.md", text)
    result["plots"] = [str(p) for p in sweep_plots(rows, out)]
    result["markdown"] = text
    return result
