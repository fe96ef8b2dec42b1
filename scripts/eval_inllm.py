"""VLM accuracy of in-LLM pruning on edgeprune-mini (held-out Fashion-MNIST), against pre-LLM pruning at
the same layer-average visual token count (METHODS_INLLM.md §1, Budget rule).

One loaded model, encoder signals cached on disk (eval/features.py), answers from the torch reference
pipeline (`reference.generate`, the in-LLM stage inside its prefill). Runs, for each K2:
- in-LLM from all 576 tokens: dart, fastv, d2pruner at L = 2; polymorphic stage 2 at 3/7/16 with a geometric
  schedule ending at K2 (576 -> ... -> K2);
- two stages: pre-LLM divprune to 2*K2 (and dart to 2*K2 before in-LLM dart), then the in-LLM method to K2
  (polymorphic: 2*K2 -> K2 at 3/7/16);
- Polymorphic as published: stage 1 (pre-LLM polymorphic) to 2*B, stage 2 solved for a layer average of B = K2;
- pre-LLM methods at K = round(layer average) of every configuration above (the one-stage comparison).
D2Pruner's prior: mean last-token attention at layer 1 over --calib training images (`edgeprune calibrate
--llm-layer 2`'s computation). Results append to OUT/results.jsonl (a rerun skips what is there), then
OUT/table.md. Each row keeps its answers, in the order of OUT/eval_set.json (the test-split indices and labels of
the n images), so rows can be re-scored and compared answer by answer (`rescore`). Example (about 3-6 hours on 2
busy cores):

    OMP_NUM_THREADS=2 nohup .venv/bin/python scripts/eval_inllm.py -n 300 --out /work/scratch/13/eval300 &
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("eval_inllm")

T_LAYERS = 30          # SmolLM2-135M
IN_LLM = ("dart", "fastv", "d2pruner", "polymorphic")
POLY_LAYERS = (3, 7, 16)


def geometric(k: int, k2: int, stages: int = 3) -> list[int]:
    """k -> ... -> k2 in `stages` steps with a constant ratio (the last is exactly k2)."""
    rho = (k2 / k) ** (1 / stages)
    return [int(np.floor(k * rho ** (s + 1) + 0.5)) for s in range(stages)]


def configs(k2s: list[int], pre_methods: list[str], n: int = 576) -> list[dict]:
    """Every run, most informative first (a long run interrupted still answers the main question):
    1. in-LLM from all N tokens, 2. the first two pre-LLM baselines at those layer averages, 3. two stages
    (divprune -> 2*K2), 4. baselines at their averages, 5. dart -> dart and Polymorphic as published with
    theirs, 6. the other baselines everywhere."""
    from edgeprune.runtime.stages import keep_for_average, layer_average

    stages, baselines = [], []

    def stage(priority, pre, pre_keep, method, keeps, layers, label):
        avg = layer_average(pre_keep, T_LAYERS, list(zip(layers, keeps)))
        stages.append({"label": label, "pre": pre, "pre_keep": pre_keep, "llm": method, "llm_keep": keeps,
                       "llm_layer": list(layers), "avg": avg, "priority": priority})

    for k2 in k2s:
        for m in IN_LLM:
            keeps, layers = (geometric(n, k2), POLY_LAYERS) if m == "polymorphic" else ([k2], [2])
            stage(1, None, n, m, keeps, layers, f"{m}@L{layers[0]} 576->{k2}")
            keeps, layers = (geometric(2 * k2, k2), POLY_LAYERS) if m == "polymorphic" else ([k2], [2])
            stage(3, "divprune", 2 * k2, m, keeps, layers, f"divprune->{2 * k2} + {m}->{k2}")
        stage(5, "dart", 2 * k2, "dart", [k2], [2], f"dart->{2 * k2} + dart->{k2}")
        keeps = list(keep_for_average("polymorphic", 2 * k2, T_LAYERS, list(POLY_LAYERS), k2))
        stage(5, "polymorphic", 2 * k2, "polymorphic", keeps, POLY_LAYERS, f"polymorphic paper B={k2}")
    seen = set()
    for c in sorted(stages, key=lambda c: c["priority"]):
        k = int(np.floor(c["avg"] + 0.5))
        for i, pre in enumerate(pre_methods):
            if (pre, k) not in seen:
                seen.add((pre, k))
                baselines.append({"label": f"{pre} K={k}", "pre": pre, "pre_keep": k, "llm": None, "llm_keep": None,
                                  "llm_layer": None, "avg": float(k), "priority": c["priority"] + 1 if i < 2 else 6})
    return sorted(stages + baselines, key=lambda c: c["priority"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k2", default="64,32,16")
    ap.add_argument("--pre-methods", default="divprune,uniform,random,dpc",
                    help="the one-stage baselines (default: the four best of the n = 100 sweep in docs/results.md)")
    ap.add_argument("--calib", type=int, default=64, help="training images for D2Pruner's in-LLM prior")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", help="comma-separated labels to run (default: all)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)

    from edgeprune import models
    from edgeprune.cli.calibrate import llm_prior_sum
    from edgeprune.cli.eval import load_eval_set
    from edgeprune.eval.data import load_split
    from edgeprune.eval.features import cached_signals
    from edgeprune.eval.vlm import CachedAdapter, evaluate
    from edgeprune.inllm import build

    args.out.mkdir(parents=True, exist_ok=True)
    adapter = models.load("edgeprune-mini")
    cached, labels, idx = load_eval_set(adapter, args.n, args.seed)
    write_eval_set(args.out / "eval_set.json", args.n, args.seed, idx, labels)
    results_file = args.out / "results.jsonl"
    done = {}
    if results_file.exists():
        for line in results_file.read_text().splitlines():
            row = json.loads(line)
            done[row["label"]] = row

    def record(row: dict) -> None:
        row["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        with open(results_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        done[row["label"]] = row
        log.info("%s: accuracy %.3f agreement %s (%.0f s; %s)", row["label"], row["accuracy"], row.get("agreement"),
                 row["seconds"], row["uptime"])

    # unpruned answers: the agreement reference
    answers_file = args.out / "unpruned_answers.json"
    if "unpruned" not in done or not answers_file.exists():
        full = evaluate(adapter, cached, labels, "none", None, seed=args.seed, batch=args.batch)
        answers_file.write_text(json.dumps(full.answers))
        record(result_row({"label": "unpruned", "avg": 576.0}, full))
    reference = json.loads(answers_file.read_text())

    # D2Pruner's in-LLM prior at L = 2 (layer 1), from training images (never the test split)
    prior_file = args.out / "d2pruner_llm_prior_L2.npy"
    if not prior_file.exists():
        images, _ = load_split("train")
        rows = np.arange(args.calib)
        calib = CachedAdapter(adapter, cached_signals(adapter, "train", rows, kind="eval"), images[rows])
        total = sum(llm_prior_sum(calib, list(range(i, min(i + 8, args.calib))), 2)
                    for i in range(0, args.calib, 8))
        np.save(prior_file, (total / args.calib).numpy().astype(np.float32))
    prior = np.load(prior_file)

    todo = configs([int(v) for v in args.k2.split(",")], args.pre_methods.split(","))
    if args.only:
        keep = set(args.only.split(","))
        todo = [c for c in todo if c["label"] in keep]
    for c in todo:
        if c["label"] in done:
            continue
        stage = None
        if c["llm"]:
            cfg = {"bias": prior} if c["llm"] == "d2pruner" else {}
            stage = build(c["llm"], keep=c["llm_keep"], layer=c["llm_layer"], **cfg)
        start = time.time()
        r = evaluate(adapter, cached, labels, c["pre"] or "none", c["pre_keep"] if c["pre"] else None,
                     reference=reference, seed=args.seed, batch=args.batch, llm_stage=stage)
        record(result_row(c, r, seconds=time.time() - start, threads=args.threads))
    write_table(args.out, list(done.values()))
    return 0


def result_row(config: dict, result, **extra) -> dict:
    """One results.jsonl row: the configuration, the scores (EvalResult.row), `extra`, and the answers in
    eval-set order."""
    return {**config, **result.row(), **extra, "answers": list(result.answers)}


def write_eval_set(path: Path, n: int, seed: int, idx, labels) -> None:
    """OUT/eval_set.json: the images the answers are in the order of (written once; a rerun must match it)."""
    from edgeprune.fileio import atomic_write

    record = {"n": n, "seed": seed, "indices": [int(i) for i in idx], "labels": [int(y) for y in labels]}
    if path.exists():
        if json.loads(path.read_text()) != record:
            raise SystemExit(f"{path}: another eval set (n, seed, indices or labels differ); use another --out")
        return
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record)))


def rescore(row: dict, labels) -> float:
    """Accuracy of a results.jsonl row's answers against `labels` (eval_set.json's), as evaluate scores them."""
    from edgeprune.eval.data import match_class

    if len(row.get("answers", [])) != len(labels):
        raise ValueError(f"{row['label']}: {len(row.get('answers', []))} answers for {len(labels)} labels")
    return float(np.mean([match_class(t) == int(y) for t, y in zip(row["answers"], labels)]))


def write_table(out: Path, rows: list[dict]) -> None:
    """table.md: every in-LLM configuration next to the best pre-LLM method at its layer-average count."""
    pre = {}
    for r in rows:
        if r.get("llm") is None and r.get("pre"):
            pre.setdefault(r["pre_keep"], []).append(r)
    lines = ["| configuration | K -> K2 (per stage) | layer avg | accuracy | agreement | best pre-LLM at round(avg) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if not r.get("llm"):
            continue
        k = int(np.floor(r["avg"] + 0.5))
        best = max(pre.get(k, []), key=lambda x: x["accuracy"], default=None)
        best_text = f"{best['pre']} {best['accuracy']:.3f}" if best else "—"
        counts = " -> ".join(str(v) for v in [r["pre_keep"], *r["llm_keep"]])
        lines.append(f"| {r['label']} | {counts} | {r['avg']:.1f} | {r['accuracy']:.3f} | {r['agreement']:.3f} | "
                     f"{best_text} (K={k}) |")
    (out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    raise SystemExit(main())
