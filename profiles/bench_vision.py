"""Vision graph latency: the exported graph on ONNX Runtime vs the same module in torch eager.

edgeprune-mini (DINOv2-S/14 at 336 px, 576 tokens) by default; each method at K and unpruned (K = N),
so the table also shows what the pruner adds to the encoder in each backend. Systems are timed round-robin
(one call each per round, after a warm-up round), medians.

    python -m edgeprune.profiles.bench_vision --methods divprune,dart,visionzip --keep 64 --threads 1 --runs 5
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _time_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    from edgeprune.export.vision import VisionGraph, example_pixels, export_vision
    from edgeprune.models import load

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="edgeprune-mini")
    parser.add_argument("--methods", default="divprune,dart,visionzip")
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    adapter = load(args.model)
    n = adapter.num_image_tokens
    pixels = example_pixels(adapter, args.batch)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = args.threads
    methods = [m for m in args.methods.split(",") if m]
    points = [(methods[0], n)] + [(m, args.keep) for m in methods]
    feed = {"pixels": pixels.numpy()}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        systems = []   # (label, K, torch call, ORT call)
        for method, keep in points:
            pruner = adapter.build_pruner(method, keep)
            graph = VisionGraph(adapter, pruner).eval()
            path = export_vision(adapter, pruner, Path(tmp) / f"{method}-{keep}.onnx")
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            systems.append(("full" if keep == n else method, keep, lambda g=graph: g(pixels),
                            lambda s=session: s.run(None, feed)))
        times = [([], []) for _ in systems]
        for _ in range(args.runs + 1):   # round-robin, so a change in the machine's load hits every system alike
            for (_, _, torch_call, ort_call), (torch_ms, ort_ms) in zip(systems, times):
                torch_ms.append(_time_ms(torch_call))
                ort_ms.append(_time_ms(ort_call))
        rows = [(label, keep, statistics.median(t[1:]), statistics.median(o[1:]))   # the first round warms up
                for (label, keep, _, _), (t, o) in zip(systems, times)]
    print(f"Vision graph, {args.model}, batch {args.batch}, {args.threads} thread(s), median of {args.runs} rounds "
          "round-robin\n")
    print("| method | K | torch eager ms | ORT ms | ORT speedup | vs unpruned (ORT) |")
    print("|---|---:|---:|---:|---:|---:|")
    base = rows[0][3]
    for method, keep, t, o in rows:
        print(f"| {method} | {keep} | {t:.1f} | {o:.1f} | {t / o:.2f}x | {100 * (o - base) / base:+.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
