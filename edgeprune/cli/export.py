"""Export a VLM with a pruner to a bundle: vision graph (static K), LLM graphs, tokenizer, manifest.

Validates the graphs against torch on seeded inputs and prints the parity report.
Example: edgeprune export --method dart --keep 64 --out bundles/mini-dart64
In-LLM pruning (a second budget inside the LLM prefill): edgeprune export --keep 576 --llm-method dart
--llm-keep 64 --llm-layer 2 --out bundles/mini-dart-l2-64 (several stages: --llm-keep 91,64,45 --llm-layer 3,7,16).
"""
from __future__ import annotations

import sys
from pathlib import Path


def add_parser(subparsers):
    from edgeprune.cli.args import (add_bundle_args, add_llm_stage_args, add_model_arg, add_positions_arg,
                                    add_pruner_args, count)
    from edgeprune.runtime.format import PRECISIONS

    p = subparsers.add_parser("export", help=__doc__.splitlines()[0], description=__doc__)
    add_model_arg(p)
    add_pruner_args(p)
    add_llm_stage_args(p)
    add_positions_arg(p, "the method's convention, e.g. original for dart and autoselect, else the model's")
    p.add_argument("--scorer", metavar="CKPT", help="learned scorer checkpoint (`edgeprune train`), for methods with "
                   "a `scorer` option (autoselect); default: the model's shipped one, where it ships one; "
                   "--cfg scorer=random is the untrained baseline")
    p.add_argument("--llm-precision", choices=PRECISIONS, default=None,
                   help="LLM weights: fp32 (default), fp16 (for GPUs; the model is loaded in float16, which keeps a "
                        "2-4B model's export within memory), int8 or int4 (weight-only MatMulNBits, float32 "
                        "activations; the CPU choice: smaller and faster decode). The vision graph stays float32 in "
                        "ONNX; `build-engine --fp16` makes its TensorRT engine fp16")
    p.add_argument("--fp16", action="store_true", help="same as --llm-precision fp16 (kept for older scripts)")
    p.add_argument("--batch", type=count, metavar="N", help="fix the vision graph's batch to N (default: dynamic)")
    p.add_argument("--attention", choices=("fused", "plain"), default="fused",
                   help="LLM attention kernel: ORT's fused GroupQueryAttention or plain ONNX ops (default: fused)")
    p.add_argument("--image-size", metavar="HxW", help="fixed input size for models whose token count follows the "
                   "image size: Qwen2-VL/2.5-VL/3-VL (multiples of 28 / 32, e.g. 448x448); the tile grid of "
                   "LLaVA-NeXT, InternVL and SmolVLM (multiples of the tile, e.g. 896x896 = 2x2 tiles of 448)")
    p.add_argument("--buckets", metavar="HxW,HxW,...", help="resolution buckets: one vision graph per input size, "
                   "each with its own N and the same K; the runtime picks one per image (the models of "
                   "--image-size)")
    p.add_argument("--no-validate", action="store_true", help="skip the ORT-vs-torch parity checks")
    add_bundle_args(p, output=True)
    return p


def run(args) -> int:
    from edgeprune.errors import EdgepruneError, MissingDependencyError

    try:
        from tqdm import tqdm

        from edgeprune.export.bundle import EXPORT_STEPS, check_target, export_bundle
        from edgeprune.models import load
        from edgeprune.pruners import available
    except ImportError as err:
        raise MissingDependencyError(f"export needs the full install (torch, transformers, onnx): {err}; "
                                     "this looks like a runtime-only install") from err
    from edgeprune.cli.args import llm_stage_options, pruner_options

    opts = pruner_options(args)
    stage = llm_stage_options(args)
    cfg = dict(opts.config)
    if args.scorer is not None:
        accepted = available()[opts.method].defaults
        if "scorer" not in accepted:
            raise EdgepruneError(f"--scorer: method {opts.method!r} takes no scorer option; its options: "
                                 f"{', '.join(accepted) or 'none'}")
        cfg["scorer"] = str(args.scorer)
    image_size = _size(args.image_size, "--image-size") if args.image_size else None
    buckets = [_size(b, "--buckets") for b in args.buckets.split(",") if b.strip()] if args.buckets else None
    if args.fp16 and args.llm_precision not in (None, "fp16"):
        raise EdgepruneError(f"--fp16 and --llm-precision {args.llm_precision}: choose one (--fp16 means fp16)")
    precision = "fp16" if args.fp16 else args.llm_precision or "fp32"
    check_target(args.out, args.force)  # before the model loads: a refused --out should fail fast

    bar = tqdm(total=1 + len(EXPORT_STEPS), desc="load model", unit="step", file=sys.stderr,
               disable=getattr(args, "quiet", False), bar_format="{desc:<34}{bar:20}| {n_fmt}/{total_fmt} [{elapsed}]")
    try:
        # fp16 loads the model in float16: a large LLM is then exported without a second copy of its weights
        # (the vision graph stays float32: export_bundle casts the vision weights for its export)
        adapter = load(args.model, **({"dtype": _float16()} if precision == "fp16" else {}))
        if image_size is not None:
            adapter = adapter.with_image_size(image_size)   # a clear error for fixed-size families
        bar.update(1)

        started = []

        def on_step(name: str) -> None:  # a step starts: the previous one is done
            if started:
                bar.update(1)
            started.append(name)
            bar.set_description_str(name)

        manifest = export_bundle(adapter, args.out, method=opts.method, keep=opts.keep, cfg=cfg,
                                 positions=args.positions, llm_precision=precision,
                                 batch=args.batch, attention=args.attention, force=args.force, source=str(args.model),
                                 validate=not args.no_validate, on_step=on_step, buckets=buckets,
                                 **stage.export_kwargs())
        bar.update(1)
        bar.set_description_str("done")
    finally:
        bar.close()
    print(summary(manifest, args.out))
    notice = shipped_scorer_notice(adapter, manifest)
    if notice:
        print(notice, file=sys.stderr)
    return 0


def shipped_scorer_notice(adapter, manifest: dict) -> str | None:
    """The quality notice of the model's shipped scorer (pruners/autoselect.py quality_notice) when the
    bundle runs that scorer; None for any other scorer or method."""
    from edgeprune.pruners.autoselect import quality_notice
    from edgeprune.runtime.format import Keys, ScorerRecord

    record, shipped = manifest[Keys.PRUNER_SCORER], adapter.pruner_options().get("scorer")
    if not record or not isinstance(shipped, str) or record.get(ScorerRecord.FILE) != Path(shipped).name:
        return None
    return quality_notice(shipped, record.get(ScorerRecord.SHA256))


def _float16():
    import torch

    return torch.float16


def _size(text: str, option: str) -> tuple[int, int]:
    from edgeprune.errors import EdgepruneError

    h, sep, w = text.strip().lower().partition("x")
    if not sep or not h.isdigit() or not w.isdigit() or int(h) < 1 or int(w) < 1:
        raise EdgepruneError(f"{option} {text!r}: expected HEIGHTxWIDTH in pixels, e.g. 448x448")
    return int(h), int(w)


def summary(manifest: dict, out) -> str:
    """The lines printed after an export: what was written and the parity report."""
    from edgeprune.runtime.format import Keys
    from edgeprune.runtime.llm import describe_precision

    m = manifest
    lines = [f"exported {out}: {m[Keys.MODEL_SOURCE]} ({m[Keys.MODEL_FAMILY]}), method {m[Keys.PRUNER_METHOD]}, "
             f"K={m[Keys.PRUNER_KEEP]} of N={m[Keys.MODEL_NUM_IMAGE_TOKENS]}, {m[Keys.POSITIONS_MODE]} positions, "
             f"LLM {describe_precision(m)}, vision batch {m[Keys.VISION_BATCH] or 'dynamic'}"]
    if m[Keys.LLM_STAGE_METHOD] is not None:
        from edgeprune.cli.inspect import stage_text

        lines.append(f"in-LLM stage: {stage_text(m)}")
    lines += parity_lines(m)
    return "\n".join(lines)


def parity_lines(manifest: dict) -> list[str]:
    """The validation reports of a manifest (format.Keys.VALIDATION_*), one line per graph."""
    from edgeprune.runtime.format import PASSED, Keys

    v, llm = manifest[Keys.VALIDATION_VISION], manifest[Keys.VALIDATION_LLM]
    if not v and not llm:
        return ["parity: not validated (--no-validate)"]
    lines = ["parity (ONNX Runtime vs torch, seeded inputs):"]
    if v:   # the report's numbers as export_bundle writes them; '?' where a hand-edited manifest lacks one
        pos = ("positions identical" if v.get("positions_equal")
               else f"positions DIFFER in rows {v.get('positions_mismatch_rows', '?')}")
        extras = v.get("extras_max_abs_diff")
        extras = "".join(f", {k} max |diff| {_sci(d)}" for k, d in extras.items()) if isinstance(extras, dict) else ""
        lines.append(f"  vision: {v.get('images', '?')} images, {pos}, image tokens max |diff| "
                     f"{_sci(v.get('max_abs_diff'))} (tolerance {_sci(v.get('tolerance'), 0)}){extras}  "
                     f"{'OK' if v[PASSED] else 'FAILED'}")
    if llm:
        ok = llm[PASSED]
        numbers = ", ".join(f"{k} {_sci(llm.get(k))}" for k in ("embed", "prefill", "decode") if k in llm)
        tol = f" (tolerance {_sci(llm.get('tolerance'), 0)})"
        if llm.get("metric") == "relative_rms":   # fp16 / quantized graphs against the float32 model
            tol = (f"; relative RMS prefill {_fixed(llm.get('prefill_relative'))}, decode "
                   f"{_fixed(llm.get('decode_relative'))} (tolerance {_fixed(llm.get('tolerance'))})")
        lines.append(f"  llm:    max |logit diff| {numbers}{tol}  {'OK' if ok else 'FAILED'}")
        if "greedy_agreement" in llm:
            lines.append(f"          greedy tokens (teacher-forced, {llm.get('greedy_tokens', '?')}): "
                         f"{_fixed(llm['greedy_agreement'])} agree with torch float32 (garbage below "
                         f"{_fixed(llm.get('min_agreement'))})")
        if "greedy_agreement_image" in llm:
            lines.append(f"          of them with image tokens ({llm.get('greedy_tokens_image', '?')}): "
                         f"{_fixed(llm['greedy_agreement_image'])}")
        stage = llm.get("prefill_stage")
        if stage:
            if stage.get("metric") == "relative_rms":   # a quantized graph: overlap with the float32 slots
                overlap = ", ".join(_fixed(v) for v in stage["keep_overlap"])
                kept = (f"kept slots shared with float32 {overlap} (stage by stage; garbage below "
                        f"{_fixed(stage['min_overlap'])}), relative RMS prefill {_fixed(stage['prefill_relative'])}, "
                        f"decode {_fixed(stage['decode_relative'])} (tolerance {_fixed(stage['tolerance'])})")
            else:
                kept = ("kept slots identical" if not stage["keep_mismatch_stages"]
                        else f"kept slots DIFFER at stage(s) {stage['keep_mismatch_stages']}")
                kept += f", max |logit diff| prefill {_sci(stage.get('prefill'))}, decode {_sci(stage.get('decode'))}"
            lines.append(f"  in-LLM: prefill.onnx vs the torch reference loop: {kept}  "
                         f"{'OK' if stage.get(PASSED) else 'FAILED'}")
    return lines


def _sci(value, digits: int = 2) -> str:
    return f"{value:.{digits}e}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def _fixed(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"
