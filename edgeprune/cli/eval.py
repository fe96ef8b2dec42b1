"""Measure answer accuracy vs the token budget K on held-out Fashion-MNIST (exact class match).

One (method, K): accuracy unpruned and pruned, and agreement with the unpruned answers.
--sweep: every --methods x --keeps, a Markdown table, a JSON file and a plot in --out.
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
    p.add_argument("--out", type=Path, default=None, help="folder for results.json, table.md, plot.png")
    p.add_argument("--reference", type=Path, metavar="RESULTS_JSON",
                   help="VLM mode: take the unpruned answers from an earlier results.json of the same model, n and "
                        "seed instead of recomputing them (the unpruned pass is the costliest point)")
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
            cells.append("—" if r is None or r.get("error") else f"{r[value]:.3f}")
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

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.num_images < 1:
        raise EdgepruneError(f"--num-images {args.num_images}: expected >= 1")
    adapter = models.load(args.model)
    if not hasattr(adapter, "feature_layer") or not hasattr(getattr(adapter, "vision", None), "layernorm"):
        raise EdgepruneError(f"eval: model {args.model!r} is not supported; expected edgeprune-mini (a DINOv2 adapter)")
    n_img = adapter.num_image_tokens
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
            "test_indices": [int(i) for i in idx], "cfg": {m: {k: str(v) for k, v in o.items()} for m, o in options.items() if o}}
    if args.probe:
        unpruned, rows, value = _run_probe(adapter, cached, labels, methods, keeps, args, options)
        info["probe_train_images"] = args.probe_train
        title = f"LLM-free: probe top-1 vs K (n={len(labels)})"
    else:
        from edgeprune.eval.vlm import evaluate, sweep

        full = _reference(args.reference, info, n_img) if args.reference else None
        if args.sweep:
            full, results = sweep(adapter, cached, labels, methods, keeps, seed=args.seed, batch=args.batch,
                                  options=options, full=full)
        else:
            full = full or evaluate(adapter, cached, labels, "none", None, seed=args.seed, batch=args.batch)
            results = [] if keeps[0] == n_img else [evaluate(adapter, cached, labels, methods[0], keeps[0],
                                                             reference=full.answers, seed=args.seed, batch=args.batch,
                                                             **options[methods[0]])]
        unpruned, rows, value = full.accuracy, [r.row() for r in results], "accuracy"
        info["unpruned_answers"] = full.answers
        title = f"edgeprune-mini answer accuracy vs K (n={len(labels)})"
    print(f"unpruned ({n_img} tokens): {value} {unpruned:.3f}  (n={len(labels)}, seed={args.seed})")
    for r in rows:
        extra = f"  agreement {r['agreement']:.3f}" if r.get("agreement") is not None else ""
        status = f"error: {r['error']}" if r.get("error") else f"{value} {r[value]:.3f}{extra}"
        print(f"{r['method']:>22} K={r['keep']:<4} {status}")
    if args.out:
        from edgeprune.fileio import atomic_write

        report = json.dumps({**info, "value": value, "unpruned": unpruned, "rows": rows}, indent=1) + "\n"
        atomic_write(args.out / "results.json", lambda tmp: Path(tmp).write_text(report))
        if args.sweep:
            table = markdown_table(rows, value, keeps, unpruned, n_img)
            atomic_write(args.out / "table.md", lambda tmp: Path(tmp).write_text(table))
            plot(rows, value, keeps, unpruned, n_img, args.out / "plot.png", title)
        print(f"wrote {args.out}")
    return 0


def _reference(path: Path, info: dict, n_img: int):
    """The unpruned EvalResult of an earlier `edgeprune eval` results.json on the same images."""
    from edgeprune.errors import EdgepruneError
    from edgeprune.eval.vlm import EvalResult

    try:
        ref = json.loads(Path(path).read_text())
        same = {k: ref[k] for k in ("model", "n", "seed", "test_indices")}
        unpruned, answers = float(ref["unpruned"]), list(ref["unpruned_answers"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise EdgepruneError(f"--reference {path}: not a VLM results.json of `edgeprune eval` ({err})") from None
    if same != {k: info[k] for k in same}:
        raise EdgepruneError(f"--reference {path}: another model, n, seed or image set than this run "
                             f"({same['model']}, n={same['n']}, seed={same['seed']})")
    return EvalResult("none", n_img, info["n"], unpruned, None, 0.0, answers=answers)


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
