"""Sweep methods and budgets: export (or reuse) bundles, profile each, write a table and plots.

Example: edgeprune sweep --model edgeprune-mini --methods dart,divprune --keep 576,192,128,64,32 --out reports/sweep
Writes sweep.json (stable keys), sweep.md and sweep.png / pruner_overhead.png under --out; bundles
go to --out/bundles and are reused when a matching one is already there.
"""
from __future__ import annotations

from pathlib import Path


def _int_list(text: str) -> list[int]:
    from edgeprune.errors import EdgepruneError

    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EdgepruneError(f"--keep {text!r}: expected comma-separated integers, e.g. 576,128,64") from None


def add_parser(subparsers):
    from edgeprune.cli.args import count, count0

    p = subparsers.add_parser("sweep", help=__doc__.splitlines()[0], description=__doc__)
    p.add_argument("--model", default="edgeprune-mini", help="preset or local model directory (default edgeprune-mini)")
    p.add_argument("--methods", default="dart,divprune", help="comma-separated methods (default dart,divprune)")
    p.add_argument("--keep", default="576,192,128,64,32", help="comma-separated budgets K (default 576,192,128,64,32)")
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument("--runs", type=count, default=3, help="timed runs per point (default 3)")
    p.add_argument("--warmup", type=count0, default=1, help="warm-up runs per point (default 1)")
    p.add_argument("--new-tokens", type=count, default=8, help="tokens generated per run (default 8)")
    p.add_argument("--positions", choices=("original", "compact"), help="position mode of the bundles")
    p.add_argument("--image", type=Path, help="image to run (default: a shipped photo)")
    p.add_argument("--threads", type=count, help="ONNX Runtime intra-op threads")
    return p


def run(args) -> int:
    from tqdm import tqdm

    from edgeprune.errors import EdgepruneError
    from edgeprune.profiles.sweep import run_sweep
    from edgeprune.pruners import available

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in available()]
    if not methods or unknown:
        raise EdgepruneError(f"--methods {args.methods!r}: unknown {unknown}; available: {', '.join(available())}")
    keeps = _int_list(args.keep)
    if not keeps:
        raise EdgepruneError("--keep: expected at least one budget")
    with tqdm(desc="sweep", unit="bundle") as bar:
        def progress(label: str, total: int) -> None:
            bar.total = total
            bar.set_postfix_str(label)
            bar.update(1)

        result = run_sweep(args.model, methods, keeps, args.out, runs=args.runs, warmup=args.warmup,
                           new_tokens=args.new_tokens, image=args.image, threads=args.threads,
                           positions=args.positions, progress=progress)
    print(result["markdown"])
    print(f"written: {args.out / 'sweep.json'}, {args.out / 'sweep.md'}, " + ", ".join(result["plots"]))
    return 0
