"""Kernels per decode step of a bundle's decoder, from ONNX Runtime's profiler (after its graph optimisations).

    python -m edgeprune.profiles.decode_kernels BUNDLE_OR_LLM_DIR [--past 130] [--steps 10] [--threads 1]

A decode step of a small LLM is a few hundred kernels; each costs a few microseconds of launch and memory traffic
besides the MatMuls, so their number is what graph fusion (export/decoder_ops.py) reduces. Prints the count, the
op histogram of one step with each op's kernel time, and the step's wall time and summed kernel time (medians).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

__all__ = ["decode_kernels", "main"]


def decode_kernels(bundle_dir: Path, manifest: dict, *, past: int = 130, steps: int = 10, threads: int = 1) -> dict:
    """`manifest`: the bundle's, or export_llm's entries. Prefill `past` random tokens, then `steps` decode steps through the runtime's own path (OrtLLM.forward with
    its KV cache), profiled. -> {"kernels": per step, "ops": {op: count in one step}, "op_ms": {op: its kernel ms
    per step, median}, "step_ms", "kernel_ms"}."""
    import onnxruntime as ort

    from edgeprune.runtime.format import Graph, Keys
    from edgeprune.runtime.llm import OrtLLM

    llm = OrtLLM(bundle_dir, manifest, providers=["cpu"], threads=threads)
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.enable_profiling, opts.profile_file_prefix = True, str(Path(tmp) / "decode")
        llm.decoder = ort.InferenceSession(str(Path(bundle_dir) / manifest[Keys.LLM_DECODER_GRAPH][Graph.FILE]), opts,
                                           providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        d = manifest[Keys.LLM_HIDDEN_SIZE]
        cache = llm.new_cache(1, past + steps)
        positions = np.arange(past + steps)[None]
        if llm.rope == "mrope":
            positions = np.broadcast_to(positions, (3, 1, past + steps))
        llm.forward(rng.standard_normal((1, past, d)).astype(llm.dtype), positions[..., :past], cache)
        wall = []
        for t in range(steps):
            start = time.perf_counter()
            llm.forward(rng.standard_normal((1, 1, d)).astype(llm.dtype), positions[..., past + t:past + t + 1], cache)
            wall.append(time.perf_counter() - start)
        events = json.loads(Path(llm.decoder.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"][1:]          # the first run is the prefill
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_step = [[e for e in kernels if r["ts"] <= e["ts"] <= r["ts"] + r["dur"]] for r in runs]
    op_ms = {op: 1e-3 * statistics.median(sum(e["dur"] for e in step if e["args"]["op_name"] == op)
                                          for step in per_step)
             for op in {e["args"]["op_name"] for e in per_step[-1]}}
    return {"kernels": len(per_step[-1]), "ops": dict(Counter(e["args"]["op_name"] for e in per_step[-1])),
            "op_ms": op_ms, "step_ms": 1e3 * statistics.median(wall),
            "kernel_ms": 1e-3 * statistics.median(sum(e["dur"] for e in step) for step in per_step)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="a bundle, or a folder export_llm wrote (with its entries as "
                        "llm.json)")
    parser.add_argument("--past", type=int, default=130, help="tokens in the KV cache (default: 130)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    from edgeprune.runtime.llm import llm_manifest

    out = decode_kernels(args.bundle, llm_manifest(args.bundle), past=args.past, steps=args.steps, threads=args.threads)
    print(f"decode step at {args.past} past tokens, {args.threads} thread(s): {out['kernels']} kernels, "
          f"{out['step_ms']:.2f} ms wall, {out['kernel_ms']:.2f} ms in kernels (medians of {args.steps})")
    print(", ".join(f"{op} {n} ({out['op_ms'][op]:.2f} ms)"
                    for op, n in sorted(out["ops"].items(), key=lambda kv: -out["op_ms"][kv[0]])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
