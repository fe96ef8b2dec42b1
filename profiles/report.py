"""Profile and sweep reports: JSON (stable keys), Markdown tables and PNG plots, written atomically."""
from __future__ import annotations

import json
from pathlib import Path

from edgeprune.fileio import atomic_write
from edgeprune.profiles.interleave import NOISY

__all__ = ["write_atomic", "profile_markdown", "sweep_markdown", "sweep_plots", "ms", "mib", "pct", "pruner_line"]


def write_atomic(path: Path, data: str | bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data.encode() if isinstance(data, str) else data))


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, allow_nan=False, default=str) + "\n")


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def profile_markdown(report: dict, reference: dict | None = None, comparison: dict | None = None) -> str:
    """One bundle's table (median, p90, min-max and spread per stage), its pruner cost, memory; with
    `reference` and `comparison` (profiler.compare), the paired speedups against the reference bundle."""
    lat = report["latency_s"]
    rows = [("preprocess", lat["preprocess"]), ("vision (encoder + pruner + projector)", lat["vision"]),
            ("embed + sequence", lat["embed"]), ("LLM prefill", lat["prefill"]),
            ("time to first token", lat["ttft"]), ("decode per token", lat["decode_per_token"]),
            ("decode (all tokens)", lat["decode"]), ("total", lat["total"])]
    runs = report["settings"]["runs"]
    others = report["settings"].get("interleaved_with", 0)
    how = f"{runs} runs" + (f", interleaved round-robin with {others} other bundle(s)" if others else "")
    lines = [f"### {report.get('label', report['method'])} K={report['keep']} of N={report['num_image_tokens']} ({report['bundle']})", "",
             f"{how}; load average {_load(report)}", "",
             "| stage | median ms | p90 ms | min-max ms | spread |", "|---|---:|---:|---:|---:|"]
    for name, s in rows:
        lines.append(f"| {name} | {ms(s['median'])} | {ms(s['p90'])} | {ms(s['min'])}-{ms(s['max'])} | "
                     f"{pct(s.get('spread_pct'))} |")
    lines += ["", pruner_line(report["pruner"])]
    if reference is not None and comparison is not None:
        lines += ["", f"against {reference['bundle']} (K={reference['keep']}), the same rounds "
                      "(ratio = reference / this bundle, per round):", "",
                  "| stage | reference median ms | speedup | spread | |", "|---|---:|---:|---:|---|"]
        for stage, c in comparison.items():
            lines.append(f"| {stage} | {ms(reference['latency_s'][stage]['median'])} | {c['median']:.2f}x | "
                         f"{pct(c['spread_pct'])} | {NOISY if c['noisy'] else ''} |")
    mem = report["memory"]
    tps = report["tokens_per_s"]
    scope = mem.get("peak_rss_scope", "this bundle")
    lines += ["", f"tokens/s: {tps:.1f}" if tps else "tokens/s: -",
              f"prompt tokens: {report['tokens']['prompt']} (K={report['keep']} image + "
              f"{report['tokens']['text_tokens']} text), generated: {report['tokens']['generated']}", "",
              "| memory | MiB |", "|---|---:|",
              f"| peak RSS ({scope}) | {mib(mem['peak_rss_bytes'])} |",
              *(f"| weights: {k} | {mib(v)} |" for k, v in mem["weights_bytes"].items()),
              f"| KV cache at end ({mem['kv_cache_tokens']} tokens) | {mib(mem['kv_cache_bytes'])} |"]
    groups = mem.get("kv_cache_groups") or []
    if len(groups) > 1 or report.get("llm_stage"):
        lines += [f"| KV cache expected, layers {g['layers'][0]}-{g['layers'][1] - 1} ({g['tokens']} tokens each) | "
                  f"{mib(g['bytes'])} |" for g in groups]
        lines.append(f"| KV cache expected, all layers | {mib(mem['kv_cache_bytes_expected'])} |")
    for name, probe in mem["device"].items():
        lines.append(f"| {name} memory | {mib(probe['used_bytes'])} |" if probe["available"]
                     else f"| {name} memory | n/a ({probe['reason']}) |")
    stage = report.get("llm_stage")
    if stage:
        stages = ", ".join(f"L={s['layer']}: {s['keep_in']} -> {s['keep_out']}" for s in stage["stages"])
        ratio = stage["prefill_flop_ratio_predicted"]
        predicted = "unknown (the bundle lacks num_heads / intermediate_size)" if ratio is None else \
            f"{ratio:.3f} of the unpruned prefill's MACs (speedup {1 / ratio:.2f}x at most)"
        lines += ["", f"in-LLM stage {stage['method']} ({stages}; KV policy {stage['kv_policy']}; layer-average "
                      f"visual tokens {stage['layer_average']:.1f}): predicted prefill cost {predicted}"]
    return "\n".join(lines) + "\n"


def pruner_line(pruner: dict) -> str:
    if not pruner["available"]:
        return f"pruner: not measured ({pruner['reason']})"
    share, t = pruner["share"], pruner["time_s"]
    inferred = pruner["inferred_s"]["median"] or 0.0
    note = f"; {NOISY}" if pruner["slowdown"]["noisy"] else ""
    return (f"pruner (ONNX Runtime node profile, {pruner['nodes']} nodes, {pruner['runs']} runs): {ms(t['median'])} ms "
            f"median ({pct(t['spread_pct'])} spread) = {100 * share['median']:.2f}% of the vision graph's node time "
            f"({100 * share['min']:.2f}-{100 * share['max']:.2f}%){note}"
            + (f"; {ms(inferred)} ms of it from fused nodes without a scope" if inferred else ""))


def _load(report: dict) -> str:
    load = report.get("host", {}).get("load_average")
    return "n/a" if not load else " / ".join(f"{v:.2f}" for v in load) + " (1/5/15 min)"


def sweep_markdown(rows: list[dict], meta: dict) -> str:
    load = meta.get("load_average")
    lines = [f"## Sweep: {meta['model']} (N={meta['num_image_tokens']}, M={meta['text_tokens']} text tokens, "
             f"{meta['runs']} runs per point interleaved round-robin after {meta.get('warmup', 1)} warm-up, "
             f"{meta['new_tokens']} new tokens; load average "
             f"{'n/a' if not load else ' / '.join(f'{v:.2f}' for v in load)})", "",
             "Speedups are reference (K = N) / this point, per round; ± is the spread (max - min) / median over "
             f"the rounds; a row is noisy when a ratio spreads more than {meta.get('noise_limit_pct', 10):.0f}%. "
             "Pruner % = the pruner's nodes in ONNX Runtime's node profile of its own vision graph, per run: median "
             "(min-max); its ratio is graph / (graph - pruner). Layer avg = image tokens per LLM layer on average (an "
             "in-LLM point keeps all N up to its stage layer); MACs predict = the prefill speedup the LLM's "
             "multiply-accumulates predict (profiles/flops.py).", "",
             "| method | K | layer avg | TTFT ms | prefill ms | vision ms | pruner ms | pruner % of vision | "
             "decode ms/token | KV MiB | KV ratio | TTFT speedup | prefill speedup | MACs predict | limit (N+M)/(K+M) | "
             "vision speedup | noise |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        pruner_ms = "-" if r["pruner_ms"] is None else f"{r['pruner_ms']:.1f}"
        overhead = "-"
        if r["pruner_overhead_pct"] is not None:
            low, high = r["pruner_overhead_range_pct"]
            overhead = f"{r['pruner_overhead_pct']:.2f} ({low:.2f}-{high:.2f})"
        predicted = "-" if r["speedup_predicted"] is None else f"{r['speedup_predicted']:.2f}x"
        lines.append(f"| {r['method']} | {r['keep']} | {r['layer_average']:.1f} | "
                     f"{r['ttft_ms']:.1f} ±{pct(r['ttft_spread_pct'])} | "
                     f"{r['prefill_ms']:.1f} | {r['vision_ms']:.1f} | {pruner_ms} | {overhead} | "
                     f"{r['decode_ms_per_token']:.1f} | {mib(r['kv_bytes'])} | {r['kv_ratio']:.3f} | "
                     f"{r['ttft_speedup']:.2f}x ±{pct(r['ttft_speedup_spread_pct'])} | "
                     f"{r['prefill_speedup']:.2f}x ±{pct(r['prefill_speedup_spread_pct'])} | {predicted} | "
                     f"{r['token_limit']:.2f}x | "
                     f"{r['vision_speedup']:.2f}x ±{pct(r['vision_speedup_spread_pct'])} | {r['note'] or 'ok'} |")
    return "\n".join(lines) + "\n"


def sweep_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """TTFT and prefill vs K per method, KV bytes vs K, pruner overhead, speedup vs the token-count limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in rows})
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (ax_ttft, ax_pre), (ax_kv, ax_speed) = axes
    for method in methods:
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["keep"])
        ks = [r["keep"] for r in rs]
        ax_ttft.plot(ks, [r["ttft_ms"] for r in rs], marker="o", label=method)
        ax_pre.plot(ks, [r["prefill_ms"] for r in rs], marker="o", label=method)
        ax_speed.plot(ks, [r["prefill_speedup"] for r in rs], marker="o", label=method)
    ks_all = sorted({r["keep"] for r in rows})
    limit = {r["keep"]: r["token_limit"] for r in rows}
    ax_speed.plot(ks_all, [limit[k] for k in ks_all], "k--", label="limit (N+M)/(K+M)")
    kv = {r["keep"]: r["kv_bytes"] / 2**20 for r in rows}
    ax_kv.plot(ks_all, [kv[k] for k in ks_all], "k-o")
    for ax, title, ylabel in ((ax_ttft, "Time to first token", "ms"), (ax_pre, "LLM prefill", "ms"),
                              (ax_kv, "KV cache at end of generation", "MiB"),
                              (ax_speed, "Prefill speedup vs K = N", "x")):
        ax.set_title(title)
        ax.set_xlabel("K (image tokens kept)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_ttft.legend(fontsize=8)
    ax_speed.legend(fontsize=8)
    fig.tight_layout()
    paths = [out_dir / "sweep.png"]
    atomic_write(paths[0], lambda tmp: fig.savefig(tmp, dpi=110))
    overhead = [r for r in rows if r["pruner_overhead_pct"] is not None and r["keep"] < r["num_image_tokens"]]
    if overhead:
        fig, ax = plt.subplots(figsize=(8, 4))
        labels = [f"{r['method']}\nK={r['keep']}" for r in overhead]
        ax.bar(range(len(overhead)), [r["pruner_overhead_pct"] for r in overhead])
        ax.set_xticks(range(len(overhead)), labels, fontsize=7)
        ax.set_ylabel("% of the vision graph's node time")
        ax.set_title("Pruner cost (ONNX Runtime node profile)")
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        paths.append(out_dir / "pruner_overhead.png")
        atomic_write(paths[-1], lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close("all")
    return paths

