"""Real-size exports on this machine: random-weight models with the published configs, exported with an fp16 LLM,
then loaded and run by the torch-free runtime. Writes the measured table to docs/realsize.md.

No weights are downloaded: each model directory is written here from the hyperparameters below (copied from the
published config.json of each model) with seeded random fp16 weights and a stand-in byte-level tokenizer (token
ids are meaningless; shapes, memory and time are what is measured). Steps, each in its own process so its peak
RSS (the kernel's high-water mark, RUSAGE_CHILDREN) is its own:

  make    write the model directory (skipped when it exists)
  export  `edgeprune export --model DIR --method M --keep K --fp16` (validation on: ORT vs torch on seeded inputs)
  run     `Pipeline(bundle)` on a real photo: shapes, first-token latency (preprocess + vision + prefill), RSS

    python scripts/realsize_export.py --work /work/scratch/15/realsize --models smolvlm-256m,smolvlm-500m,qwen2-vl-2b

Run one model at a time on a shared machine (check `free -g` first); `--check-free-gib` refuses to start an
export when less memory than that is available.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from edgeprune.runtime.format import Keys   # torch-free: the bundle format's key names

ROOT = Path(__file__).resolve().parent.parent

# Published hyperparameters (config.json of each model; token ids kept as published, the tokenizer is a stand-in).
SMOLVLM_VISION = {"model_type": "idefics3_vision", "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                  "num_attention_heads": 12, "image_size": 512, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
                  "layer_norm_eps": 1e-6}   # SigLIP base patch 16 at 512 px, shared by the 256M and 500M models


def smolvlm(source: str, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> dict:
    """A SmolVLM-Instruct (Idefics3) entry: the shared vision tower and a SmolLM2 text model."""
    text = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": 64, "vocab_size": 49280,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "hidden_act": "silu",
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    return {"source": source, "model_type": "idefics3",
            "config": {"model_type": "idefics3", "architectures": ["Idefics3ForConditionalGeneration"],
                       "image_token_id": 49190, "scale_factor": 4, "tie_word_embeddings": False,
                       "vision_config": SMOLVLM_VISION, "text_config": text},
            "export": ["--method", "dart", "--keep", "128"]}   # 2 x 2 tiles + global: 5 x 64 tokens + 14 markers


MODELS = {
    "smolvlm-256m": smolvlm("HuggingFaceTB/SmolVLM-256M-Instruct", 576, 1536, 30, 9, 3),    # SmolLM2-135M
    "smolvlm-500m": smolvlm("HuggingFaceTB/SmolVLM-500M-Instruct", 960, 2560, 32, 15, 5),   # SmolLM2-360M
    "qwen2-vl-2b": {
        "source": "Qwen/Qwen2-VL-2B-Instruct", "model_type": "qwen2_vl",
        "config": {"model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"],
                   "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
                   "vision_end_token_id": 151653, "tie_word_embeddings": True,
                   "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16,
                                     "in_channels": 3, "hidden_size": 1536, "patch_size": 14,
                                     "spatial_merge_size": 2, "temporal_patch_size": 2},
                   "text_config": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                                   "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                                   "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "hidden_act": "silu",
                                   "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                                       "mrope_section": [16, 24, 24]},
                                   "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 28,
                                   "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645}},
        "export": ["--method", "dart", "--keep", "64"],     # 448 x 448: 16 x 16 = 256 merged tokens
    },
}

MAKE = r"""
import json, sys, torch
from pathlib import Path
from transformers import AutoConfig, PreTrainedTokenizerFast
name, spec, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
cfg = dict(spec["config"]); model_type = cfg.pop("model_type")
config = AutoConfig.for_model(model_type, **cfg)
config._attn_implementation = "sdpa"
if model_type == "idefics3":
    from transformers import Idefics3ForConditionalGeneration as cls
    from edgeprune.models.smolvlm import SMOL_SPECIALS as specials
else:
    from transformers import Qwen2VLForConditionalGeneration as cls
    from edgeprune.models.qwen2_vl import QWEN_SPECIALS as specials
from edgeprune.models.tiny import byte_tokenizer
torch.manual_seed(0)
torch.set_default_dtype(torch.float16)          # random weights made in fp16: the directory holds fp16 weights
model = cls(config).eval()
tmp = out.with_name(out.name + ".tmp")
model.save_pretrained(tmp, max_shard_size="1GB")
PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer(specials)).save_pretrained(tmp)
params = sum(p.numel() for p in model.parameters())
vision = sum(p.numel() for n, p in model.named_parameters() if "vision" in n or "visual" in n or "connector" in n)
(tmp / "edgeprune_realsize.json").write_text(json.dumps({"name": name, "params": params, "vision_params": vision,
                                                         "source": spec["source"]}))
tmp.rename(out)
"""

RUN = r"""
import json, sys, time
import numpy as np
from PIL import Image
from edgeprune.runtime.pipeline import Pipeline
from edgeprune.runtime.format import Keys
bundle, image, repeats, tokens = sys.argv[1], Image.open(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
start = time.perf_counter()
pipe = Pipeline(bundle, threads=2)
load_s = time.perf_counter() - start
runs = [pipe(image, "Describe the image.", max_new_tokens=tokens) for _ in range(1 + repeats)]   # first: warm-up
first = [sum(r.timings[s] for s in ("preprocess", "vision", "embed", "prefill")) for r in runs[1:]]
r = runs[-1]
m = pipe.bundle.manifest
assert r.positions.shape == (1, m[Keys.PRUNER_KEEP]), r.positions.shape
assert len(r.ids[0]) >= 1 and r.num_prompt_tokens > m[Keys.PRUNER_KEEP]
print(json.dumps({"load_s": load_s, "first_token_s": min(first), "vision_s": min(x.timings["vision"] for x in runs[1:]),
                  "prefill_s": min(x.timings["prefill"] for x in runs[1:]), "decode_ms_per_token":
                  1000 * min(x.timings["decode"] / max(1, len(x.decode_steps)) for x in runs[1:]),
                  "prompt_tokens": r.num_prompt_tokens, "keep": m[Keys.PRUNER_KEEP]}))
"""

WRAP = r"""
import resource, subprocess, sys, time, json
start = time.perf_counter()
proc = subprocess.run(sys.argv[2:], stdout=subprocess.PIPE, text=True)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as f:
    json.dump({"rc": proc.returncode, "wall_s": time.perf_counter() - start, "peak_rss": usage.ru_maxrss * 1024,
               "stdout": proc.stdout}, f)
"""


def measured(cmd: list[str], tag: str, work: Path) -> dict:
    """Run `cmd` in a fresh child: its exit code, wall time and peak RSS (kernel high-water mark)."""
    out = work / f".measure-{tag}.json"
    subprocess.run([sys.executable, "-c", WRAP, str(out), *cmd], check=True)
    result = json.loads(out.read_text())
    out.unlink()
    if result["rc"] != 0:
        raise SystemExit(f"{tag}: {' '.join(cmd)} failed with exit code {result['rc']}")
    return result


def available_gib() -> float:
    import psutil

    return psutil.virtual_memory().available / 2**30


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_model(name: str, work: Path, check_free: float, repeats: int, tokens: int) -> dict:
    spec = MODELS[name]
    model_dir, bundle = work / name, work / f"{name}-bundle"
    if not model_dir.is_dir():
        print(f"[{name}] writing a random-weight model directory with the published config", flush=True)
        made = measured([sys.executable, "-c", MAKE, name, json.dumps(spec), str(model_dir)], f"{name}-make", work)
        print(f"[{name}] made in {made['wall_s']:.0f} s, peak RSS {made['peak_rss'] / 2**30:.1f} GiB", flush=True)
    info = json.loads((model_dir / "edgeprune_realsize.json").read_text())
    if available_gib() < check_free:
        raise SystemExit(f"[{name}] only {available_gib():.1f} GiB available, below --check-free-gib {check_free}; "
                         "retry when the machine is quieter")
    exe = str(Path(sys.executable).with_name("edgeprune"))
    print(f"[{name}] export ({available_gib():.1f} GiB available, load {os.getloadavg()[0]:.1f})", flush=True)
    export = measured([exe, "export", "-q", "--model", str(model_dir), *spec["export"], "--fp16", "--out", str(bundle),
                       "--force"], f"{name}-export", work)
    manifest = json.loads((bundle / "manifest.json").read_text())
    image = ROOT / "profiles" / "chelsea.png"
    print(f"[{name}] exported in {export['wall_s']:.0f} s, peak RSS {export['peak_rss'] / 2**30:.2f} GiB; run "
          f"(load {os.getloadavg()[0]:.1f})", flush=True)
    run = measured([sys.executable, "-c", RUN, str(bundle), str(image), str(repeats), str(tokens)], f"{name}-run", work)
    timing = json.loads(run["stdout"].strip().splitlines()[-1])
    params, vision = info["params"], info["vision_params"]
    fp16_bytes = 2 * params
    vision_check, llm_check = manifest[Keys.VALIDATION_VISION], manifest[Keys.VALIDATION_LLM]
    row = {
        "model": name, "source": info["source"], "params": params, "vision_params": vision,
        "fp16_weight_bytes": fp16_bytes, "bundle_bytes": folder_bytes(bundle),
        # what the bundle should hold: the vision graph in fp32, the LLM in fp16, the token embedding table twice
        # (embed.onnx and, tied or not, the decoder's lm_head) unless untied (then it is two different matrices)
        "export_peak_rss": export["peak_rss"], "export_s": export["wall_s"],
        "rss_ratio": export["peak_rss"] / fp16_bytes, "runtime_peak_rss": run["peak_rss"],
        "vision_parity": vision_check["max_abs_diff"], "llm_parity": max(llm_check["prefill"], llm_check["decode"]),
        "n": manifest[Keys.MODEL_NUM_IMAGE_TOKENS], "runs": repeats, "new_tokens": tokens,
        "load": f"{os.getloadavg()[0]:.1f}", **timing,
    }
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict], load: str) -> str:
    gib = 2**30
    lines = [
        "| model (published config) | params (vision) | N -> K | bundle | export peak RSS | RSS / fp16 weights | "
        "export time | first token | decode | runtime peak RSS | parity vision / LLM | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} ({r['source']}) | {r['params'] / 1e9:.2f} B ({r['vision_params'] / 1e6:.0f} M) | "
            f"{r['n']} -> {r['keep']} | {r['bundle_bytes'] / gib:.2f} GiB | {r['export_peak_rss'] / gib:.2f} GiB | "
            f"{r['rss_ratio']:.2f} | {r['export_s'] / 60:.1f} min | {r['first_token_s']:.2f} s | "
            f"{r['decode_ms_per_token']:.0f} ms/token | {r['runtime_peak_rss'] / gib:.2f} GiB | "
            f"{r['vision_parity']:.1e} / {r['llm_parity']:.1e} | {r.get('load', '?')} |")
    return "\n".join(lines) + f"\n\nMachine: {load}\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="folder for model directories and bundles (large)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--out", type=Path, help="write the table (Markdown) here, e.g. docs/realsize.md")
    p.add_argument("--check-free-gib", type=float, default=0.0,
                   help="refuse to start an export with less available memory than this")
    p.add_argument("--repeats", type=int, default=2, help="timed runtime requests after the warm-up (default 2)")
    p.add_argument("--tokens", type=int, default=8, help="new tokens per runtime request (default 8)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [run_model(name, args.work, args.check_free_gib, args.repeats, args.tokens) for name in names]
    saved = args.work / "realsize.json"   # rows of models measured earlier (other runs) are kept
    earlier = [r for r in (json.loads(saved.read_text()) if saved.is_file() else []) if r["model"] not in names]
    rows = earlier + rows
    load = (f"{os.cpu_count()} cores, {available_gib():.0f} GiB available at the end; load = the 1-minute load "
            f"average when the row's runtime step ended (shared with other processes), {time.strftime('%Y-%m-%d')}")
    text = table(rows, load)
    print(text)
    saved.write_text(json.dumps(rows, indent=2))
    if args.out:
        from edgeprune.fileio import atomic_write

        atomic_write(args.out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
