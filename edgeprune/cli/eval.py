"""Measure answer accuracy vs the token budget K on held-out Fashion-MNIST (exact class match).

One (method, K): accuracy unpruned and pruned, and agreement with the unpruned answers.
--sweep: every --methods x --keeps, a Markdown table, a JSON file and a plot in --out (K = N, the
unpruned pass, only when N is in --keeps; --merge combines runs on the same images into one table).
--cfg KEY=VALUE goes to the methods that take it (scorer=random: "autoselect (untrained)").
--llm-method (single run): the pruned image tokens are pruned again inside the LLM (METHODS_INLLM.md);
scripts/eval_inllm.py compares such stages with pre-LLM pruning at equal layer-average token counts.
--probe: the LLM-free evaluation instead (DINOv2 re-run on [CLS] + the kept patches, linear probe
on [CLS] trained on unpruned train images; top-1 vs K). Encoder signals are cached on disk.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("edgeprune.eval")

ALL = "all"


def add_parser(subparsers):
    from edgeprune.cli.args import add_model_arg, add_threads_arg, count, count0

    p = subparsers.add_parser("eval", help=__doc__.splitlines()[0], description=__doc__)
    add_model_arg(p)
    p.add_argument("--data", type=Path, default=None,
                   help="Fashion-MNIST folder with the IDX gz files (default: /usr/share/datasets/fashion-mnist)")
    p.add_argument("--method", default="random", help="pruning method for a single run (default: random)")
    p.add_argument("--keep", type=count, default=None, help="token budget K for a single run (default: N)")
    p.add_argument("--sweep", action="store_true", help="every --methods x --keeps; writes a table and a plot")
    p.add_argument("--probe", action="store_true", help="LLM-free evaluation (linear probe on re-run [CLS])")
    p.add_argument("--methods", default=ALL, help="comma-separated methods for --sweep (default: all)")
    p.add_argument("--cfg", action="append", metavar="KEY=VALUE",
                   help="method option, repeatable, given to the methods that take it (e.g. scorer=random: the "
                        "untrained autoselect baseline, reported as 'autoselect (untrained)')")
    p.add_argument("--keeps", default="576,192,128,64,32,16,8", help="comma-separated K for --sweep")
    p.add_argument("-n", "--num-images", type=count, default=50, help="held-out test images (default: 50)")
    p.add_argument("--seed", type=count0, default=0, help="picks the test subset and seeds random methods (default: 0)")
    p.add_argument("--probe-train", type=count, default=1200, help="train images for the linear probe (default: 1200)")
    p.add_argument("--batch", type=count, default=16, help="images per forward (default: 16)")
    add_threads_arg(p, "torch")
    p.add_argument("--llm", type=Path, default=None, metavar="DIR",
                   help="answer with the LLM exported in DIR (a bundle, e.g. one exported with --llm-precision int4) "
                        "run by the runtime, instead of the torch LLM; vision, pruning and prompt are unchanged")
    p.add_argument("--out", type=Path, default=None, help="folder for results.json, table.md, plot.png")
    p.add_argument("--merge", type=Path, nargs="+", metavar="RESULTS_JSON",
                   help="only combine results.json files of earlier runs on the same images (e.g. methods run in "
                        "parallel, the unpruned K=N run apart: it is the costliest point) into one table in --out")
    from edgeprune.cli.args import add_llm_stage_args

    add_llm_stage_args(p)
    return p


def _methods(spec: str) -> list[str]:
    from edgeprune.errors import EdgepruneError
    from edgeprune.pruners import available

    names = list(available()) if spec == ALL else [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in available()]
    if unknown:
        raise EdgepruneError(f"--methods: unknown {', '.join(unknown)}; available: {', '.join(available())}")
    return names


def _keeps(spec: str, n_img: int) -> list[int]:
    from edgeprune.errors import EdgepruneError

    try:
        keeps = [int(k) for k in spec.split(",") if k.strip()]
    except ValueError as err:
        raise EdgepruneError(f"--keeps {spec!r}: expected comma-separated integers") from err
    bad = [k for k in keeps if not 1 <= k <= n_img]
    if bad or not keeps:
        raise EdgepruneError(f"--keeps {spec!r}: every K must be in 1..{n_img}")
    return keeps


def load_eval_set(adapter, n: int, seed: int, data_dir=None):
    """(CachedAdapter over n held-out test images, their labels, the test-split indices)."""
    from edgeprune.eval.data import eval_indices, load_split
    from edgeprune.eval.features import cached_signals
    from edgeprune.eval.vlm import CachedAdapter

    images, labels = load_split("test", data_dir)
    idx = eval_indices(n, seed, total=len(labels))
    signals = cached_signals(adapter, "test", idx, kind="eval", data_dir=data_dir)
    return CachedAdapter(adapter, signals, images[idx]), labels[idx], idx


def markdown_table(rows: list[dict], value: str, keeps: list[int], unpruned: float, n_img: int) -> str:
    """methods x K table of `value` (accuracy/top1); the K = N column is the unpruned figure."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    head = "| method | " + " | ".join(f"K={k}" for k in keeps) + " |"
    lines = [head, "|" + "---|" * (len(keeps) + 1)]
    for m in methods:
        cells = []
        for k in keeps:
            if k == n_img:
                cells.append(f"{unpruned:.3f}")
                continue
            r = next((r for r in rows if r["method"] == m and r["keep"] == k), None)
            cells.append("—" if r is None or r.get("error") or r.get(value) is None else f"{r[value]:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], value: str, keeps: list[int], unpruned: float, n_img: int, path: Path, title: str):
    import matplotlib

    from edgeprune.fileio import atomic_write

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab20").colors          # 11+ methods: the default 10-colour cycle repeats
    for i, m in enumerate(dict.fromkeys(r["method"] for r in rows)):
        pts = sorted((r["keep"], r[value]) for r in rows if r["method"] == m and not r.get("error"))
        if n_img in keeps:
            pts.append((n_img, unpruned))
        style = "--" if m in ("random", "uniform") else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=m,
                color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20])
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(keeps))
    ax.set_xticklabels([str(k) for k in sorted(keeps)])
    ax.axhline(0.1, color="grey", lw=0.8, ls=":", label="chance")
    ax.set_xlabel("kept image tokens K")
    ax.set_ylabel(value)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)


def run(args) -> int:
    import torch

    from edgeprune import models
    from edgeprune.errors import EdgepruneError

    if args.merge:
        return _merge(args.merge, args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.num_images < 1:
        raise EdgepruneError(f"--num-images {args.num_images}: expected >= 1")
    adapter = models.load(args.model)
    if not hasattr(adapter, "feature_layer") or not hasattr(getattr(adapter, "vision", None), "layernorm"):
        raise EdgepruneError(f"eval: model {args.model!r} is not supported; expected edgeprune-mini (a DINOv2 adapter)")
    n_img = adapter.num_image_tokens
    llm = _exported_llm(args.llm, args.threads) if args.llm else None
    from edgeprune.cli.args import llm_stage_options

    stage_opts = llm_stage_options(args)
    if stage_opts.method is not None and (args.sweep or args.probe):
        raise EdgepruneError("--llm-method: single runs only (not with --sweep or --probe); see scripts/eval_inllm.py")
    if stage_opts.method is not None and args.llm:
        raise EdgepruneError(f"--llm-method with --llm {args.llm}: the in-LLM stage runs in the torch reference only")
    llm_stage = None
    if stage_opts.method is not None:
        from edgeprune.inllm import build_for_budget

        llm_stage = build_for_budget(stage_opts.method, num_image=args.keep or n_img,
                                     num_layers=adapter.llm.config.num_hidden_layers, keep=stage_opts.keep,
                                     layer=stage_opts.layer, average=stage_opts.average, **stage_opts.config)
    cached, labels, idx = load_eval_set(adapter, args.num_images, args.seed, args.data)
    if args.sweep:
        methods, keeps = _methods(args.methods), _keeps(args.keeps, n_img)
    else:
        methods, keeps = [args.method], [args.keep if args.keep is not None else n_img]
        _methods(args.method)
        _keeps(str(keeps[0]), n_img)
    from edgeprune.cli.args import parse_key_values
    from edgeprune.pruners import options_by_method

    options = options_by_method(methods, parse_key_values(args.cfg))
    info = {"model": args.model, "n": len(labels), "seed": args.seed, "image_tokens": n_img,
            "test_indices": [int(i) for i in idx], "cfg": {m: {k: str(v) for k, v in o.items()} for m, o in options.items() if o},
            "llm": "torch" if llm is None else f"{args.llm} ({llm.description})"}
    if args.probe:
        unpruned, rows, value = _run_probe(adapter, cached, labels, methods, keeps, args, options)
        info["probe_train_images"] = args.probe_train
    else:
        from edgeprune.eval.vlm import evaluate, sweep

        if args.sweep:
            full, results = sweep(adapter, cached, labels, methods, keeps, seed=args.seed, batch=args.batch,
                                  options=options, llm=llm)
        else:
            full = evaluate(adapter, cached, labels, "none", None, seed=args.seed, batch=args.batch, llm=llm)
            pruned = keeps[0] < n_img or llm_stage is not None
            results = [evaluate(adapter, cached, labels, methods[0], keeps[0] if keeps[0] < n_img else None,
                                reference=full.answers, seed=args.seed, batch=args.batch, llm=llm, llm_stage=llm_stage,
                                kv_policy=stage_opts.kv_policy, **options[methods[0]])] if pruned else []
            if llm_stage is not None:
                results[0].method = f"{results[0].method} + in-LLM {llm_stage.name} {list(llm_stage.keep or [])}"
        # rows keep their answers, so runs on the same images can be merged later (--merge)
        rows, value = [{**r.row(), "answers": r.answers} for r in results], "accuracy"
        unpruned = full.accuracy if full else None
        info["unpruned_answers"] = full.answers if full else None
    _report(info, value, unpruned, rows, keeps, n_img, args.out, write_table=args.sweep)
    return 0


def _report(info: dict, value: str, unpruned: float | None, rows: list[dict], keeps: list[int], n_img: int,
            out: Path | None, write_table: bool) -> None:
    """Print the rows; with `out`, write results.json (and table.md and plot.png for a sweep)."""
    n = info["n"]
    title = (f"LLM-free: probe top-1 vs K (n={n})" if value == "top1"
             else f"edgeprune-mini answer accuracy vs K (n={n})")
    if unpruned is None:
        print(f"unpruned ({n_img} tokens): not measured (K={n_img} not in --keeps)  (n={n}, seed={info['seed']})")
    else:
        print(f"unpruned ({n_img} tokens): {value} {unpruned:.3f}  (n={n}, seed={info['seed']}"
              f"{', LLM ' + info['llm'] if info.get('llm') else ''})")
    for r in rows:
        extra = f"  agreement {r['agreement']:.3f}" if r.get("agreement") is not None else ""
        status = f"error: {r['error']}" if r.get("error") else f"{value} {r[value]:.3f}{extra}"
        print(f"{r['method']:>22} K={r['keep']:<4} {status}")
    if out:
        from edgeprune.fileio import atomic_write

        report = json.dumps({**info, "value": value, "unpruned": unpruned, "rows": rows}, indent=1) + "\n"
        atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(report))
        if write_table:
            table = markdown_table(rows, value, keeps, unpruned, n_img)
            atomic_write(out / "table.md", lambda tmp: Path(tmp).write_text(table))
            if any(r.get("agreement") is not None for r in rows):   # VLM: same answer as unpruned, vs K
                agree = markdown_table(rows, "agreement", keeps, 1.0, n_img)
                atomic_write(out / "agreement.md", lambda tmp: Path(tmp).write_text(agree))
            plot(rows, value, keeps, unpruned, n_img, out / "plot.png", title)
        print(f"wrote {out}")


SAME = ("model", "n", "seed", "test_indices", "value", "image_tokens")   # what merged runs must share


def _merge(paths: list[Path], out: Path | None) -> int:
    """Combine results.json files of runs on the same images: the unpruned figure from the run that
    measured it, every pruned row, agreement recomputed from the stored answers; one table and plot."""
    from edgeprune.errors import EdgepruneError
    from edgeprune.eval.vlm import agreement

    parts = []
    for path in paths:
        try:
            part = json.loads(Path(path).read_text())
            parts.append((path, {k: part[k] for k in SAME}, part))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise EdgepruneError(f"--merge {path}: not a results.json of `edgeprune eval` ({err})") from None
    first_path, same, _ = parts[0]
    for path, other, _ in parts[1:]:
        if other != same:
            differ = [k for k in SAME if other[k] != same[k]]
            raise EdgepruneError(f"--merge {path}: {', '.join(differ)} differ from {first_path}'s; "
                                 "merge only runs on the same images")
    info = {**{k: same[k] for k in SAME if k != "value"}, "merged": [str(p) for p in paths]}
    measured = [part for _, _, part in parts if part.get("unpruned") is not None]
    unpruned = measured[0]["unpruned"] if measured else None
    reference = measured[0].get("unpruned_answers") if measured else None
    info["unpruned_answers"] = reference
    rows, seen = [], set()
    for path, _, part in parts:
        for row in part["rows"]:
            key = (row["method"], row["keep"])
            if key in seen:
                raise EdgepruneError(f"--merge {path}: {row['method']} K={row['keep']} is in two of the files")
            seen.add(key)
            if reference is not None and row.get("answers") and not row.get("error"):
                row = {**row, "agreement": agreement(row["answers"], reference)}
            rows.append(row)
    n_img = same["image_tokens"]
    keeps = sorted({r["keep"] for r in rows} | ({n_img} if unpruned is not None else set()), reverse=True)
    _report(info, same["value"], unpruned, rows, keeps, n_img, out, write_table=True)
    return 0


def _exported_llm(folder: Path, threads: int | None):
    """The runtime's LLM of a bundle (or of a folder export_llm wrote with its entries, runtime.llm.LLM_ENTRIES)."""
    from edgeprune.runtime.llm import OrtLLM, llm_manifest

    return OrtLLM(folder, llm_manifest(folder), threads=threads)


def _run_probe(adapter, cached, labels, methods, keeps, args, options):
    from edgeprune.eval.data import load_split
    from edgeprune.eval.features import cached_signals
    from edgeprune.eval.probe import probe_sweep, train_probe

    _, train_labels = load_split("train", args.data)
    train = cached_signals(adapter, "train", range(args.probe_train), kind="train", data_dir=args.data)
    probe = train_probe(train["cls"], train_labels[:args.probe_train], seed=args.seed)
    unpruned, rows = probe_sweep(adapter, cached, labels, probe, methods, keeps, seed=args.seed, batch=args.batch,
                                 options=options)
    return unpruned, rows, "top1"
