"""Profile a bundle on this device: per-stage latency (median, p90, spread), the pruner's cost, memory.

Example: edgeprune profile bundles/mini-k64 --device-profile jetson-orin-nano-8gb --out reports/k64
The pruner's cost comes from ONNX Runtime's per-node profile of the vision graph (its nodes' share of
the graph's time, run by run). With --reference DIR (the same model exported unpruned) both bundles
are timed interleaved, round-robin after a warm-up each, and the speedups are taken round by round;
one that spreads too much is flagged "noisy: re-run on a quiet machine". With --soak N, N requests
run back to back and RSS growth and latency drift are reported.
"""
from __future__ import annotations

from pathlib import Path


def add_parser(subparsers):
    from edgeprune.cli.args import add_bundle_args, add_device_args, add_threads_arg, count, count0

    p = subparsers.add_parser("profile", help=__doc__.splitlines()[0], description=__doc__)
    add_bundle_args(p)
    p.add_argument("--image", type=Path, help="image to run (default: a photo shipped with edgeprune)")
    p.add_argument("--prompt", help="prompt (default: 'Describe the image in one sentence.')")
    p.add_argument("--runs", type=count, default=5, help="timed runs (default 5)")
    p.add_argument("--warmup", type=count0, default=1, help="untimed warm-up runs (default 1)")
    p.add_argument("--new-tokens", type=count, default=16, help="tokens to generate per run (default 16)")
    p.add_argument("--batch", type=count, default=1, help="images per request (default 1)")
    p.add_argument("--reference", type=Path, metavar="DIR",
                   help="unpruned bundle of the same model, timed interleaved with BUNDLE: paired speedups")
    p.add_argument("--soak", type=count, metavar="N", help="run N requests back to back; report RSS growth and drift")
    p.add_argument("--out", type=Path, help="report folder (profile.json, profile.md); nothing is overwritten "
                                            "without --force")
    p.add_argument("--force", action="store_true", help="overwrite an existing report")
    add_threads_arg(p)
    add_device_args(p)
    return p


def run(args) -> int:
    from tqdm import tqdm

    from edgeprune.cli.args import device_profile
    from edgeprune.errors import EdgepruneError
    from edgeprune.profiles.profiler import DEFAULT_PROMPT, compare, profile_bundles, soak
    from edgeprune.profiles.report import profile_markdown, write_atomic, write_json

    device, providers = device_profile(args)
    if args.out and args.out.exists() and any(args.out.iterdir()) and not args.force:
        raise EdgepruneError(f"report folder {args.out} exists and is not empty; pass --force to overwrite")
    prompt = args.prompt or DEFAULT_PROMPT
    common = dict(image=args.image, prompt=prompt, providers=providers, threads=args.threads)
    if args.soak:
        with tqdm(total=args.soak, desc="soak", unit="req", disable=args.quiet) as bar:
            result = soak(args.bundle, args.soak, new_tokens=args.new_tokens, progress=bar.update, **common)
        print(f"soak: {result['requests']} requests | RSS {result['rss_baseline_bytes'] / 2**20:.1f} -> "
              f"{result['rss_final_bytes'] / 2**20:.1f} MiB ({result['rss_growth_pct']:+.2f}%, goal < 5%) | latency "
              f"{result['latency_first_tenth_s'] * 1e3:.1f} -> {result['latency_last_tenth_s'] * 1e3:.1f} ms "
              f"({result['latency_drift_pct']:+.1f}%)")
        if args.out:
            write_json(args.out / "soak.json", result)
        return 0
    if args.reference:
        _check_reference(args.bundle, args.reference)
    bundles = [args.bundle] + ([args.reference] if args.reference else [])
    with tqdm(total=args.runs * len(bundles), desc="profile", unit="run", leave=False, disable=args.quiet) as bar:
        reports = profile_bundles(bundles, runs=args.runs, warmup=args.warmup, new_tokens=args.new_tokens,
                                  batch=args.batch, device=device, progress=bar.update, **common)
    report, ref, comparison = reports[0], None, None
    if args.reference:
        ref = reports[1]
        comparison = compare(report, ref)
        report["reference"] = {"bundle": ref["bundle"], "latency_s": ref["latency_s"], "samples_s": ref["samples_s"],
                               "comparison": comparison}
    text = profile_markdown(report, ref, comparison)
    print(text)
    if args.out:
        write_json(args.out / "profile.json", report)
        write_atomic(args.out / "profile.md", text)
        print(f"report written to {args.out}")
    return 0


def _check_reference(bundle, reference) -> None:
    """Before any timing: the reference must be an unpruned bundle (K = N) of the same N."""
    from edgeprune.errors import EdgepruneError
    from edgeprune.runtime.bundle import read_manifest
    from edgeprune.runtime.format import Keys

    n = read_manifest(bundle)[Keys.MODEL_NUM_IMAGE_TOKENS]
    ref = read_manifest(reference)
    if ref[Keys.MODEL_NUM_IMAGE_TOKENS] != n or ref[Keys.PRUNER_KEEP] != ref[Keys.MODEL_NUM_IMAGE_TOKENS]:
        raise EdgepruneError(f"--reference {reference}: expected an unpruned bundle (K = N = {n}), got "
                             f"K={ref[Keys.PRUNER_KEEP]} of N={ref[Keys.MODEL_NUM_IMAGE_TOKENS]}")
