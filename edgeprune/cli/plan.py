"""Plan the budget: the largest K (and the method) that fit a device's memory and a TTFT target.

Examples:
  edgeprune plan --bundle bundles/mini-k64 --device-profile jetson-orin-nano-8gb --context 256 --ttft-ms 300 \
      --sweep reports/sweep/sweep.json
  edgeprune plan --model edgeprune-mini --device-profile cpu-generic --context 128
Memory is estimated from the model's shapes; TTFT comes from a measured sweep (--sweep) or a short
prefill calibration of a bundle on this machine (--calibrate). The output says which is which.
"""
from __future__ import annotations

from pathlib import Path


def add_parser(subparsers):
    from edgeprune.cli.args import add_model_arg, count, positive_float

    p = subparsers.add_parser("plan", help=__doc__.splitlines()[0], description=__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", type=Path, help="an exported bundle of the model (torch-free)")
    add_model_arg(source, default=None, torch_note=True)
    p.add_argument("--device-profile", required=True, metavar="NAME|FILE", help="device profile (see profiles/devices)")
    p.add_argument("--context", type=count, default=128, help="text tokens per request: prompt + answer (default 128)")
    p.add_argument("--ttft-ms", type=positive_float, help="time-to-first-token target in ms")
    p.add_argument("--batch", type=count, default=1, help="images per request (default 1)")
    p.add_argument("--sweep", type=Path, help="sweep.json from `edgeprune sweep` run on the target device")
    p.add_argument("--calibrate", action="store_true", help="time the bundle's LLM prefill here (needs --bundle)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def facts_from_model(name: str):
    """The same facts an export records (adapter.vision_facts, the LLM config), from the loaded model."""
    from edgeprune.models import load
    from edgeprune.profiles.planner import ModelFacts

    adapter = load(name)
    cfg = adapter.llm.config
    llm_params = sum(p.numel() for p in adapter.llm.parameters())
    total = sum(p.numel() for p in adapter.parameters())
    heads = cfg.num_attention_heads
    vision = adapter.vision_facts()
    return ModelFacts(name=name, num_image_tokens=adapter.num_image_tokens, vision_params=total - llm_params,
                      llm_params=llm_params, num_layers=cfg.num_hidden_layers, num_heads=heads,
                      num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                      head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, hidden_size=cfg.hidden_size,
                      intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
                      vision_hidden=vision["hidden_size"], vision_layers=vision["num_layers"],
                      vision_tokens=vision["tokens_per_view"], vision_views=vision["views"])


def run(args) -> int:
    import json

    from edgeprune.errors import EdgepruneError
    from edgeprune.profiles.device import load_device_profile
    from edgeprune.profiles.planner import calibrate_prefill, facts_from_bundle, latency_from_sweep, plan

    device = load_device_profile(args.device_profile)
    if args.calibrate and not args.bundle:
        raise EdgepruneError("--calibrate times a bundle's LLM: pass --bundle DIR")
    facts = facts_from_bundle(args.bundle) if args.bundle else facts_from_model(args.model)
    latency = None
    if args.sweep:
        latency = latency_from_sweep(args.sweep)
    elif args.calibrate:
        latency = {"any method (LLM prefill only)": calibrate_prefill(args.bundle, args.context)}
    result = plan(facts, device, context=args.context, ttft_ms=args.ttft_ms, latency=latency, batch=args.batch)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"plan for {facts.name} on {device.name}: memory budget {result['memory_budget_bytes'] / 2**30:.2f} GiB, "
          f"context {args.context} text tokens, batch {args.batch}"
          + (f", TTFT target {args.ttft_ms:.0f} ms" if args.ttft_ms else ""))
    methods = sorted({m for r in result["rows"] for m in r["ttft_ms"]})
    header = "| K | weights MiB | KV MiB | activations MiB | total MiB | fits |" + "".join(
        f" TTFT {m} ms |" for m in methods)
    print(header)
    print("|" + "---:|" * (6 + len(methods)))
    for r in result["rows"]:
        mem = {k: v / 2**20 for k, v in r["memory"].items()}
        cells = "".join(f" {r['ttft_ms'][m]:.1f}{'' if r['ttft_source'][m] == 'measured' else '*'} |" for m in methods)
        print(f"| {r['keep']} | {mem['weights']:.0f} | {mem['kv_cache']:.1f} | {mem['activations']:.0f} | "
              f"{mem['total']:.0f} | {'yes' if r['fits_memory'] else 'no'} |{cells}")
    rec = result["recommendation"]
    if rec is None:
        print("no K fits: the model does not fit this device's memory (or no K meets the TTFT target)")
    else:
        method = f" with {rec['method']}" if rec["method"] else ""
        print(f"recommendation: K = {rec['keep']}{method}")
    for note in result["notes"]:
        print(f"note: {note}")
    if methods:
        print("* estimated, not measured at this K")
    return 0
