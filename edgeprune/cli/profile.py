"""Profile a bundle on this device: per-stage latency (median, p90, spread) and memory.

Example: edgeprune profile bundles/mini-k64 --device-profile jetson-orin-nano-8gb --out reports/k64
With --reference DIR (the same model exported unpruned), the vision time is split into encoder and
pruner. With --soak N, N requests run back to back and RSS growth and latency drift are reported.
"""
from __future__ import annotations

from pathlib import Path


def add_parser(subparsers):
    from edgeprune.cli.args import add_bundle_args, add_device_args, count, count0

    p = subparsers.add_parser("profile", help=__doc__.splitlines()[0], description=__doc__)
    add_bundle_args(p)
    p.add_argument("--image", type=Path, help="image to run (default: a photo shipped with edgeprune)")
    p.add_argument("--prompt", help="prompt (default: 'Describe the image in one sentence.')")
    p.add_argument("--runs", type=count, default=5, help="timed runs (default 5)")
    p.add_argument("--warmup", type=count0, default=1, help="untimed warm-up runs (default 1)")
    p.add_argument("--new-tokens", type=count, default=16, help="tokens to generate per run (default 16)")
    p.add_argument("--batch", type=count, default=1, help="images per request (default 1)")
    p.add_argument("--reference", type=Path, metavar="DIR",
                   help="unpruned bundle of the same model: splits vision time into encoder and pruner")
    p.add_argument("--soak", type=count, metavar="N", help="run N requests back to back; report RSS growth and drift")
    p.add_argument("--out", type=Path, help="report folder (profile.json, profile.md); nothing is overwritten "
                                            "without --force")
    p.add_argument("--force", action="store_true", help="overwrite an existing report")
    p.add_argument("--threads", type=count, help="ONNX Runtime intra-op threads (default: ORT's choice)")
    add_device_args(p)
    return p


def run(args) -> int:
    from tqdm import tqdm

    from edgeprune.errors import EdgepruneError
    from edgeprune.profiles.device import load_device_profile
    from edgeprune.profiles.profiler import DEFAULT_PROMPT, profile_bundle, soak, summarize
    from edgeprune.profiles.report import profile_markdown, write_atomic, write_json

    device = load_device_profile(args.device_profile) if args.device_profile else None
    if args.out and args.out.exists() and any(args.out.iterdir()) and not args.force:
        raise EdgepruneError(f"report folder {args.out} exists and is not empty; pass --force to overwrite")
    prompt = args.prompt or DEFAULT_PROMPT
    common = dict(image=args.image, prompt=prompt, providers=args.provider, threads=args.threads)
    if args.soak:
        with tqdm(total=args.soak, desc="soak", unit="req") as bar:
            result = soak(args.bundle, args.soak, new_tokens=args.new_tokens, progress=bar.update, **common)
        print(f"soak: {result['requests']} requests | RSS {result['rss_baseline_bytes'] / 2**20:.1f} -> "
              f"{result['rss_final_bytes'] / 2**20:.1f} MiB ({result['rss_growth_pct']:+.2f}%, goal < 5%) | latency "
              f"{result['latency_first_tenth_s'] * 1e3:.1f} -> {result['latency_last_tenth_s'] * 1e3:.1f} ms "
              f"({result['latency_drift_pct']:+.1f}%)")
        if args.out:
            write_json(args.out / "soak.json", result)
        return 0
    with tqdm(total=args.runs, desc="profile", unit="run", leave=False) as bar:
        report = profile_bundle(args.bundle, runs=args.runs, warmup=args.warmup, new_tokens=args.new_tokens,
                                batch=args.batch, device=device, progress=bar.update, **common)
    if args.reference:
        ref = profile_bundle(args.reference, runs=args.runs, warmup=args.warmup, new_tokens=1, batch=args.batch,
                             device=device, **common)
        if ref["num_image_tokens"] != report["num_image_tokens"] or ref["keep"] != ref["num_image_tokens"]:
            raise EdgepruneError(f"--reference {args.reference}: expected an unpruned bundle (K = N = "
                                 f"{report['num_image_tokens']}), got K={ref['keep']} of N={ref['num_image_tokens']}")
        encoder = ref["latency_s"]["vision"]["median"]
        report["latency_s"]["encoder"] = summarize([encoder])
        report["latency_s"]["pruner"] = summarize([max(0.0, report["latency_s"]["vision"]["median"] - encoder)])
    text = profile_markdown(report)
    print(text)
    if args.out:
        write_json(args.out / "profile.json", report)
        write_atomic(args.out / "profile.md", text)
        print(f"report written to {args.out}")
    return 0
