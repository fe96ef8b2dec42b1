"""Benchmark every pruner (torch eager and ONNX Runtime CPU) against one CLIP ViT-L/14-336 encoder pass.

For each method in `available()` and each (N, K): the median time of `--runs` calls after warm-up, in
torch and in ORT (the exported pruner graph, CPU execution provider), next to the time of a CLIP
ViT-L/14-336-shaped vision encoder (random weights, torch, the same thread count) measured in the same
run, and the ratio in %. Methods above 1% of the encoder time are flagged.

Methods with a learned scorer (autoselect) have no trained weights at these shapes: they are timed with
their seeded random scorer (`scorer="random"`), whose architecture is the default one (the narrow
scorer, autoselect.DEFAULT_WIDTH / DEFAULT_DEPTH), so the time is the trained scorer's; the row
"autoselect-wide" is METHODS.md's original scorer (2 blocks at the encoder width), for comparison.

Shapes: tokens D = 1024, feats C = 1024, keys Ck = 64, batch 1. N = 576 is one 336 px view (grid 24x24,
pixels 336x336). N = 2880 is LLaVA-NeXT's 5 x 576 tokens: the encoder runs 5 views of 336 px (batch
5); the pruner sees one row of 2880 tokens on a nominal 48x60 grid with 672x840 pixels (LLaVA-NeXT's
tokens form no single grid; the grid only matters to grid-based methods and the AD-BTS gate).

    python profiles/bench_pruners.py --runs 5 --threads 1
    python profiles/bench_pruners.py --quick            # N=576, K=64, 3 runs: a smoke run
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("bench_pruners")

DIM, FEAT_DIM, KEY_DIM, PATCH = 1024, 1024, 64, 14
SHAPES = {576: {"grid": (24, 24), "views": 1}, 2880: {"grid": (48, 60), "views": 5}}
FLAG_PERCENT = 1.0
# extra rows: name -> (registered method, options); autoselect at METHODS.md's original width and depth
VARIANTS = {"autoselect-wide": ("autoselect", {"width": None, "depth": 2})}


@dataclass
class Row:
    method: str
    n: int
    keep: int
    torch_ms: float | None
    ort_ms: float | None
    encoder_ms: float
    note: str = ""

    def percent(self, ms: float | None) -> float | None:
        return None if ms is None else 100.0 * ms / self.encoder_ms


def median_ms(fn, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def make_signals(n: int, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    h, w = SHAPES[n]["grid"]
    attn = torch.rand(1, n, generator=g)
    return {
        "tokens": torch.randn(1, n, DIM, generator=g),
        "feats": torch.randn(1, n, FEAT_DIM, generator=g),
        "keys": torch.randn(1, n, KEY_DIM, generator=g),
        "attn": attn / attn.sum(-1, keepdim=True),
        "grid": (h, w),
        "pixels": torch.randn(1, 3, h * PATCH, w * PATCH, generator=g),
    }


def time_encoder(views: int, runs: int, warmup: int) -> float:
    """One CLIP ViT-L/14-336-shaped encoder pass over `views` images of 336 px (random weights)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14)
    torch.manual_seed(0)
    model = CLIPVisionModel(config).eval()
    pixels = torch.randn(views, 3, 336, 336)
    with torch.no_grad():
        return median_ms(lambda: model(pixel_values=pixels), runs, warmup)


def time_pruner(name: str, n: int, keep: int, threads: int, runs: int, warmup: int, tmp: Path,
                backends: tuple[str, ...]) -> tuple[float | None, float | None, str]:
    import torch

    from edgeprune.pruners import build

    from edgeprune.pruners import available

    signals = make_signals(n)
    method, options = VARIANTS.get(name, (name, {}))
    if "scorer" in available()[method].defaults:      # no trained weights at these shapes: see the docstring
        options = {"scorer": "random", **options}
    pruner = build(method, keep=keep, **options)
    args = {k: v for k, v in signals.items() if k in pruner.requires}
    notes, torch_ms, ort_ms = [], None, None
    with torch.no_grad():
        pruner(**args)  # builds anything lazy (e.g. autoselect's random scorer) before export
        if "torch" in backends:
            torch_ms = median_ms(lambda: pruner(**args), runs, warmup)
    if "ort" in backends:
        try:
            import onnxruntime as ort

            from edgeprune.export.pruner_graph import export_pruner

            path = export_pruner(pruner, signals, tmp / f"{name}-{n}-{keep}.onnx", dynamic_batch=False)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            feeds = {i.name: signals[i.name].numpy() for i in session.get_inputs()}
            ort_ms = median_ms(lambda: session.run(None, feeds), runs, warmup)
            path.unlink()
        except Exception as e:  # report and go on: one method's export failure must not end the run
            log.warning("%s N=%d K=%d: ORT failed: %s", name, n, keep, e)
            notes.append(f"ORT error: {type(e).__name__}")
    return torch_ms, ort_ms, "; ".join(notes)


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def fmt_percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}%"


def markdown(rows: list[Row], threads: int, runs: int) -> str:
    lines = [f"Pruner time vs one CLIP ViT-L/14-336 encoder pass (CPU, {threads} thread(s), median of {runs}; "
             f"flag: above {FLAG_PERCENT:g}% of the encoder)", "",
             "| method | N | K | torch ms | ORT ms | encoder ms | torch % | ORT % | flag |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        over = [b for b, ms in (("torch", r.torch_ms), ("ORT", r.ort_ms))
                if ms is not None and r.percent(ms) > FLAG_PERCENT]
        flag = (f"**> {FLAG_PERCENT:g}%** ({', '.join(over)})" if over else "") + (f" {r.note}" if r.note else "")
        lines.append(f"| {r.method} | {r.n} | {r.keep} | {fmt(r.torch_ms)} | {fmt(r.ort_ms)} | {r.encoder_ms:.0f} | "
                     f"{fmt_percent(r.percent(r.torch_ms))} | {fmt_percent(r.percent(r.ort_ms))} | {flag.strip()} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch and ORT intra-op threads (default 1)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per measurement; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (default 1)")
    parser.add_argument("--encoder-runs", type=int, default=None,
                        help="timed encoder runs (default: --runs; the encoder takes seconds per run on one thread)")
    parser.add_argument("--methods", nargs="+", metavar="NAME", help="methods to time (default: all in available())")
    parser.add_argument("--n", type=int, nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES),
                        help="token counts (default: 576 2880)")
    parser.add_argument("--keep", type=int, nargs="+", default=[64, 320], help="budgets K (default: 64 320)")
    parser.add_argument("--backends", nargs="+", choices=("torch", "ort"), default=["torch", "ort"])
    parser.add_argument("--quick", action="store_true", help="smoke run: N=576, K=64, 3 runs, 1 encoder run")
    parser.add_argument("--out", type=Path, help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.quick:
        args.n, args.keep, args.runs, args.encoder_runs = [576], [64], 3, 1
    if args.threads < 1 or args.runs < 1 or args.warmup < 0:
        parser.error("--threads and --runs must be >= 1, --warmup >= 0")

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from edgeprune.pruners import available

    torch.set_num_threads(args.threads)
    methods = args.methods or [*available(), *VARIANTS]
    unknown = sorted(set(methods) - set(available()) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(available())}")

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-pruners-") as tmp:
        for n in args.n:
            views = SHAPES[n]["views"]
            encoder_ms = time_encoder(views, args.encoder_runs or args.runs, args.warmup)
            log.info("encoder, %d view(s) of 336 px: %.0f ms", views, encoder_ms)
            for keep in args.keep:
                for name in methods:
                    try:
                        t_ms, o_ms, note = time_pruner(name, n, keep, args.threads, args.runs, args.warmup,
                                                       Path(tmp), tuple(args.backends))
                    except Exception as e:  # a method that cannot run at this shape is reported, not fatal
                        log.warning("%s N=%d K=%d failed: %s", name, n, keep, e)
                        t_ms, o_ms, note = None, None, f"error: {type(e).__name__}"
                    rows.append(Row(name, n, keep, t_ms, o_ms, encoder_ms, note))
                    log.info("%s N=%d K=%d: torch %s ms, ORT %s ms", name, n, keep, fmt(t_ms), fmt(o_ms))
    table = markdown(rows, args.threads, args.runs)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
