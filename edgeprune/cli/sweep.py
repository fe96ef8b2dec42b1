"""Sweep methods and budgets: export (or reuse) bundles, profile them interleaved, write a table and plots.

Example: edgeprune sweep --model edgeprune-mini --methods dart,divprune --keep 576,192,128,64,32 --out reports/sweep
All points are timed in one process, round-robin after a warm-up each, and compared with K = N round
by round; each ratio shows its spread, and a row whose spread is too large for its comparison says
"noisy: re-run on a quiet machine". The pruner's cost is read from ONNX Runtime's per-node profile.
In-LLM points: --llm-methods dart,fastv --llm-keeps 64,32 (all N tokens enter the LLM; the stage keeps K2 from
the method's default layer on; the table shows their layer-average tokens and the speedup their MACs predict).
Writes sweep.json (stable keys), sweep.md and sweep.png / pruner_overhead.png under --out; bundles
go to --out/bundles and are reused when a matching one is already there.
"""
from __future__ import annotations

from pathlib import Path


def add_parser(subparsers):
    from edgeprune.cli.args import add_model_arg, add_positions_arg, add_threads_arg, count, count0

    p = subparsers.add_parser("sweep", help=__doc__.splitlines()[0], description=__doc__)
    add_model_arg(p)
    p.add_argument("--methods", default="dart,divprune", help="comma-separated methods (default dart,divprune)")
    p.add_argument("--keep", default="576,192,128,64,32", help="comma-separated budgets K (default 576,192,128,64,32)")
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument("--runs", type=count, default=3, help="timed rounds: runs per point, interleaved (default 3)")
    p.add_argument("--warmup", type=count0, default=1, help="warm-up runs per point (default 1)")
    p.add_argument("--new-tokens", type=count, default=8, help="tokens generated per run (default 8)")
    add_positions_arg(p)
    p.add_argument("--image", type=Path, help="image to run (default: a shipped photo)")
    add_threads_arg(p)
    p.add_argument("--cfg", action="append", metavar="KEY=VALUE",
                   help="method option, repeatable, for the methods that take it (e.g. scorer=random: the "
                        "untrained autoselect baseline, reported as 'autoselect (untrained)')")
    p.add_argument("--llm-methods", default="", help="comma-separated in-LLM methods (default: none)")
    p.add_argument("--llm-keeps", default="", help="comma-separated in-LLM budgets K2 (needed with --llm-methods)")
    p.add_argument("--llm-layer", type=count, metavar="L", help="stage layer of every in-LLM point (default: each "
                   "method's first default layer; one stage)")
    return p


def run(args) -> int:
    from tqdm import tqdm

    from edgeprune.cli.args import int_list, parse_key_values
    from edgeprune.errors import EdgepruneError
    from edgeprune.profiles.sweep import run_sweep
    from edgeprune.pruners import available

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in available()]
    if not methods or unknown:
        raise EdgepruneError(f"--methods {args.methods!r}: unknown {unknown}; available: {', '.join(available())}")
    keeps = list(int_list(args.keep, "--keep"))
    from edgeprune.inllm import available as stage_methods

    llm_methods = [m.strip() for m in args.llm_methods.split(",") if m.strip()]
    unknown = [m for m in llm_methods if m not in stage_methods()]
    if unknown:
        raise EdgepruneError(f"--llm-methods {args.llm_methods!r}: unknown {unknown}; available: "
                             f"{', '.join(stage_methods())}")
    llm_keeps = list(int_list(args.llm_keeps, "--llm-keeps")) if args.llm_keeps else []
    if bool(llm_methods) != bool(llm_keeps):
        raise EdgepruneError("--llm-methods and --llm-keeps go together")
    with tqdm(desc="sweep", unit="step", disable=args.quiet) as bar:
        def progress(label: str, total: int) -> None:
            bar.total = total
            bar.set_postfix_str(label)
            bar.update(1)

        result = run_sweep(args.model, methods, keeps, args.out, runs=args.runs, warmup=args.warmup,
                           new_tokens=args.new_tokens, image=args.image, threads=args.threads,
                           positions=args.positions, progress=progress, cfg=parse_key_values(args.cfg),
                           llm_methods=llm_methods, llm_keeps=llm_keeps, llm_layer=args.llm_layer)
    print(result["markdown"])
    print(f"written: {args.out / 'sweep.json'}, {args.out / 'sweep.md'}, " + ", ".join(result["plots"]))
    return 0
