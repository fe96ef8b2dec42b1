"""Sweep methods x budgets: export (or reuse) a bundle per point, profile each, one table + plots.

The unpruned bundle (K = N) is exported once and is the baseline of every row: prefill speedup =
prefill(N) / prefill(K), next to the token-count limit (N + M) / (K + M), and pruner overhead =
(vision(K) - vision(N)) / vision(N). The LLM graphs are the same for every point, so they are exported
once and reused (hard-linked where possible) by the other bundles.
"""
from __future__ import annotations

import logging
from pathlib import Path

from edgeprune.errors import EdgepruneError
from edgeprune.profiles.profiler import profile_bundle
from edgeprune.profiles.report import sweep_markdown, sweep_plots, write_atomic, write_json
from edgeprune.runtime.format import Keys

__all__ = ["run_sweep", "sweep_rows", "bundle_name"]

log = logging.getLogger(__name__)


def bundle_name(method: str | None, keep: int) -> str:
    return f"full-k{keep}" if method is None else f"{method}-k{keep}"


def _matches(bundle: Path, model: str, method: str | None, keep: int) -> bool:
    """An existing bundle of this model, method (any method for the unpruned one) and K."""
    from edgeprune.errors import BundleError
    from edgeprune.runtime.bundle import read_manifest

    try:
        manifest = read_manifest(bundle)
    except BundleError:
        return False
    return (manifest[Keys.MODEL_SOURCE] == model and manifest[Keys.PRUNER_KEEP] == keep
            and method in (None, manifest[Keys.PRUNER_METHOD]))


def sweep_rows(reports: list[dict], baseline: dict) -> list[dict]:
    """Table rows from profile reports, relative to the unpruned `baseline` report."""
    n = baseline["num_image_tokens"]
    m = baseline["tokens"]["text_tokens"]
    base_prefill = baseline["latency_s"]["prefill"]["median"]
    base_vision = baseline["latency_s"]["vision"]["median"]
    base_kv = baseline["memory"]["kv_cache_bytes"]
    rows = []
    for r in reports:
        lat, k = r["latency_s"], r["keep"]
        rows.append({
            "method": r["sweep_method"], "keep": k, "num_image_tokens": n,
            "ttft_ms": lat["ttft"]["median"] * 1e3, "ttft_min_ms": lat["ttft"]["min"] * 1e3,
            "prefill_ms": lat["prefill"]["median"] * 1e3, "prefill_min_ms": lat["prefill"]["min"] * 1e3,
            "vision_ms": lat["vision"]["median"] * 1e3,
            "pruner_overhead_pct": None if k == n else 100.0 * (lat["vision"]["median"] - base_vision) / base_vision,
            "decode_ms_per_token": (lat["decode_per_token"]["median"] or 0.0) * 1e3,
            "kv_bytes": r["memory"]["kv_cache_bytes"], "kv_ratio": r["memory"]["kv_cache_bytes"] / base_kv,
            "prefill_speedup": base_prefill / lat["prefill"]["median"],
            "token_limit": (n + m) / (k + m),
        })
    return rows


def run_sweep(model: str, methods: list[str], keeps: list[int], out: Path, *, runs: int = 3, warmup: int = 1,
              new_tokens: int = 8, image=None, prompt: str | None = None, threads: int | None = None,
              positions: str | None = None, progress=None) -> dict:
    """Export/reuse bundles under out/bundles, profile them, write sweep.json, sweep.md and the plots."""
    from edgeprune.export.bundle import export_bundle
    from edgeprune.models import load

    adapter = load(model)
    n = adapter.num_image_tokens
    bad = [k for k in keeps if not 1 <= k <= n]
    if bad:
        raise EdgepruneError(f"--keep {bad}: expected 1 <= K <= N={n}")
    bundles = out / "bundles"
    points = [(None, n)] + [(m, k) for m in methods for k in sorted(set(keeps), reverse=True) if k < n]
    kw = {"image": image, "threads": threads, "runs": runs, "warmup": warmup, "new_tokens": new_tokens}
    if prompt:
        kw["prompt"] = prompt
    reports = []
    llm_source = None
    for method, k in points:
        path = bundles / bundle_name(method, k)
        if not _matches(path, model, method, k):
            # K = N: every method returns its input, so any method exports the unpruned graph
            export_bundle(adapter, path, method=method or methods[0], keep=k, positions=positions, force=True,
                          source=model, validate=False, reuse_llm_from=llm_source)
        llm_source = llm_source or path
        report = profile_bundle(path, **kw)
        report["sweep_method"] = method or "full"
        reports.append(report)
        if progress:
            progress(f"{report['sweep_method']} K={k}", len(points))
    baseline = reports[0]
    rows = sweep_rows(reports, baseline)
    # K = N is the same graph for every method: show it once per method so each curve reaches N.
    full = next(r for r in rows if r["method"] == "full")
    rows = [r for r in rows if r["method"] != "full"] + [dict(full, method=m) for m in methods]
    meta = {"model": model, "num_image_tokens": n, "text_tokens": baseline["tokens"]["text_tokens"], "runs": runs,
            "new_tokens": new_tokens, "methods": methods, "keeps": sorted(set(keeps) | {n}, reverse=True)}
    rows.sort(key=lambda r: (r["method"], -r["keep"]))
    result = {"schema": 1, "meta": meta, "rows": rows, "reports": reports}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sweep.json", result)
    text = sweep_markdown(rows, meta)
    write_atomic(out / "sweep.md", text)
    result["plots"] = [str(p) for p in sweep_plots(rows, out)]
    result["markdown"] = text
    return result
