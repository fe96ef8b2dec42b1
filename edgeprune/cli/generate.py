"""Answer a prompt about an image with the torch reference pipeline (encode, prune, project, decode).

Prints the answer, then the number of image tokens the LLM saw (K of N). Without --keep the image
is not pruned. This is the reference the exported runtime (`edgeprune run`) is compared with.
With --llm-method the image tokens are pruned again inside the LLM (the same stages the exported
prefill graph runs; METHODS_INLLM.md).
"""
from __future__ import annotations

import sys
from pathlib import Path


def add_parser(subparsers):
    from edgeprune.cli.args import add_llm_stage_args, add_model_arg, add_positions_arg, add_pruner_args, count, count0

    p = subparsers.add_parser("generate", help=__doc__.splitlines()[0], description=__doc__)
    add_model_arg(p)
    p.add_argument("--image", type=Path, action="append", required=True,
                   help="image file; repeat for a batch (one answer per image)")
    p.add_argument("--prompt", required=True, help="question about the image")
    add_positions_arg(p)
    p.add_argument("--max-new-tokens", type=count, default=32, help="decode at most this many tokens (default: 32)")
    p.add_argument("--sample", action="store_true", help="top-p sampling instead of greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass for --sample (default: 1.0)")
    p.add_argument("--temperature", type=float, default=1.0, help="temperature for --sample (default: 1.0)")
    p.add_argument("--seed", type=count0, default=0, help="sampling seed (default: 0)")
    add_pruner_args(p)
    add_llm_stage_args(p)
    return p


def run(args) -> int:
    from edgeprune import models
    from edgeprune.cli.args import llm_stage_options, pruner_options
    from edgeprune.cli.run import domain_note
    from edgeprune.errors import EdgepruneError
    from edgeprune.reference import generate

    opts = pruner_options(args)
    stage_opts = llm_stage_options(args)
    for image in args.image:
        if not image.is_file():
            raise EdgepruneError(f"--image {image}: no such file")
    adapter = models.load(args.model)
    if adapter.domain:
        print(domain_note(adapter.domain), file=sys.stderr)
    pruner = None
    if opts.keep is not None:
        pruner = adapter.build_pruner(opts.method, opts.keep, **opts.config)
    llm_stage = None
    if stage_opts.method is not None:
        from edgeprune.inllm import build_for_budget

        llm_stage = build_for_budget(stage_opts.method, num_image=opts.keep or adapter.num_image_tokens,
                                     num_layers=adapter.llm.config.num_hidden_layers, keep=stage_opts.keep,
                                     layer=stage_opts.layer, average=stage_opts.average, **stage_opts.config)
    result = generate(adapter, pruner, [str(p) for p in args.image], args.prompt,
                      max_new_tokens=args.max_new_tokens, positions=args.positions, do_sample=args.sample,
                      top_p=args.top_p, temperature=args.temperature, seed=args.seed, llm_stage=llm_stage,
                      kv_policy=stage_opts.kv_policy)
    method = opts.method if pruner is not None else "none"
    for image, text in zip(args.image, result.text):
        if len(args.image) > 1:
            print(f"[{image}]")
        print(text.strip())
    print(f"image tokens: {result.num_image_tokens} of {adapter.num_image_tokens} (method: {method}, "
          f"positions: {result.positions_mode})")
    for stage, kept in zip(llm_stage.layer if llm_stage else (), result.stage_keep):
        print(f"in-LLM {llm_stage.name} from layer {stage}: {kept.shape[1]} image tokens, slots of row 0: "
              f"{kept[0].tolist()}")
    return 0
