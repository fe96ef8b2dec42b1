"""Run a bundle on images with the torch-free runtime: stream the answer and print per-stage timing.

Example: edgeprune run bundles/mini-k64 --image examples/fashion-mnist/bag.png --prompt "What item of clothing is this?"
Several --image give a batch (one prompt, one answer per image). When the bundle says what its model
was trained to recognise (edgeprune-mini: ten Fashion-MNIST garments), that is printed once on stderr.
"""
from __future__ import annotations

import sys


def add_parser(subparsers):
    from edgeprune.cli.args import add_bundle_args, add_device_args, add_threads_arg, count, count0

    p = subparsers.add_parser("run", help=__doc__.splitlines()[0], description=__doc__)
    add_bundle_args(p)
    p.add_argument("--image", action="append", required=True, metavar="PATH",
                   help="image file, repeatable (a batch of images shares the prompt)")
    p.add_argument("--prompt", required=True, help="the question about the image(s)")
    p.add_argument("--max-new-tokens", type=count, default=64, help="stop after this many new tokens (default 64)")
    group = p.add_argument_group("sampling (default: greedy)")
    group.add_argument("--sample", action="store_true", help="top-p sampling instead of greedy decoding")
    group.add_argument("--top-p", type=float, default=0.9, help="nucleus mass (default 0.9)")
    group.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1.0)")
    group.add_argument("--seed", type=count0, default=0, help="sampling seed (default 0)")
    add_device_args(p)
    add_threads_arg(p)
    p.add_argument("--no-stream", action="store_true", help="print the answer at the end instead of streaming it")
    p.add_argument("--share-weights", action="store_true", help="bundles with an in-LLM stage: one copy of the LLM "
                   "weights for the prefill and decode graphs (about half the memory, about 10%% slower on CPU)")
    return p


def run(args) -> int:
    from edgeprune.cli.args import device_profile
    from edgeprune.runtime.pipeline import Pipeline

    _, providers = device_profile(args)   # --provider, else the profile's; a missing profile is an error
    pipe = Pipeline(args.bundle, providers=providers, threads=args.threads, share_weights=args.share_weights)
    if pipe.bundle.domain:
        print(domain_note(pipe.bundle.domain), file=sys.stderr)
    stream = len(args.image) == 1 and not args.no_stream

    def on_text(row: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = pipe(args.image if len(args.image) > 1 else args.image[0], args.prompt,
                  max_new_tokens=args.max_new_tokens, do_sample=args.sample, top_p=args.top_p,
                  temperature=args.temperature, seed=args.seed, on_text=on_text if stream else None)
    if stream:
        print()
    else:
        for path, text in zip(args.image, result.texts):
            print(f"[{path}] {text}" if len(args.image) > 1 else text)
    print(timing_line(result, pipe), file=sys.stderr)
    for name, value in result.extras.items():
        print(f"{name}: {', '.join(f'{float(v):.4g}' for v in value.reshape(-1))}", file=sys.stderr)
    if pipe.stages is not None:
        for (layer, n_in, n_out), kept in zip(pipe.stages.stages, result.stage_keep):
            print(f"in-LLM {pipe.stages.method} from layer {layer}: kept {n_out} of {n_in} image tokens; slots of "
                  f"row 0: {kept[0].tolist()}", file=sys.stderr)
    return 0


def domain_note(domain: str) -> str:
    """The one stderr line that says what the model knows, so an answer about an image outside it is not
    mistaken for a bug."""
    return f"note: this model was trained to recognise {domain}"


def timing_line(result, pipe) -> str:
    t = {k: v * 1000 for k, v in result.timings.items()}
    steps = len(result.decode_steps)
    rate = f", {steps / result.timings['decode']:.1f} tok/s" if steps and result.timings["decode"] > 0 else ""
    return (f"timing: preprocess {t['preprocess']:.1f} ms | vision {t['vision']:.1f} ms | embed {t['embed']:.1f} ms"
            f" | prefill {t['prefill']:.1f} ms ({result.num_prompt_tokens} tokens) | decode {t['decode']:.1f} ms "
            f"({steps} steps{rate}) | K={pipe.keep} of N={pipe.bundle.num_image_tokens} | KV "
            f"{result.kv_bytes / 2**20:.2f} MiB | vision on {pipe.vision.device}, LLM on {pipe.llm.device}")
