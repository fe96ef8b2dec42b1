"""Calibrate D2Pruner's positional prior: the mean encoder attention over a set of images.

Example: edgeprune calibrate --model edgeprune-mini --images photos/*.jpg --out mini-bias.npy
then:    edgeprune export --method d2pruner --keep 64 --cfg bias=mini-bias.npy --out bundles/mini-d2
The prior ([N] float32, METHODS.md D2Pruner step 1) is baked into the vision graph as a constant and
stored in the bundle; a prior of another grid size is resized by bilinear interpolation.

With --llm-layer L the prior is that of the in-LLM D2Pruner at L (METHODS_INLLM.md §4): the mean
attention of the last prompt token on each image token at LLM layer L-1, unpruned, with the prompt
"Please describe the provided image."; then --llm-method d2pruner --llm-layer L --llm-cfg bias=FILE.
"""
from __future__ import annotations

from pathlib import Path


def add_parser(subparsers):
    from edgeprune.cli.args import add_model_arg, count

    p = subparsers.add_parser("calibrate", help=__doc__.splitlines()[0], description=__doc__)
    add_model_arg(p)
    p.add_argument("--images", nargs="+", type=Path, required=True, help="calibration images (a few dozen or more)")
    p.add_argument("--out", type=Path, required=True, help="the prior to write (.npy)")
    p.add_argument("--batch-size", type=count, default=8, help="images per encoder call (default 8)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--llm-layer", type=count, metavar="L", help="the prior of the in-LLM D2Pruner at stage layer L "
                   "(last-token attention at LLM layer L-1) instead of the encoder's")
    p.add_argument("--prompt", default=LLM_PROMPT,
                   help=f"prompt for --llm-layer (default: {LLM_PROMPT!r}, the paper's)")
    return p


LLM_PROMPT = "Please describe the provided image."


def llm_prior_sum(adapter, images, layer: int, prompt: str = LLM_PROMPT):
    """Sum over `images` (one batch: paths, arrays, or rows of an eval.vlm.CachedAdapter) of
    A^(L-1)[last, image tokens] [N], unpruned (inllm/loop.py); divide by the count for the prior."""
    import torch

    from edgeprune.inllm.loop import StagedLM
    from edgeprune.reference import prefill_inputs

    inputs = prefill_inputs(adapter, None, images, prompt)
    s, n = len(inputs.prefix), adapter.num_image_tokens
    row = StagedLM(adapter.llm).last_attention(inputs.embeds, torch.from_numpy(inputs.position_ids),
                                               inputs.attention_mask, layer - 1)     # [B, L]
    return row[:, s:s + n].sum(dim=0)                                                 # [N]


def run(args) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    from edgeprune.errors import EdgepruneError
    from edgeprune.fileio import atomic_write
    from edgeprune.models import load

    if args.out.suffix != ".npy":
        raise EdgepruneError(f"--out {args.out}: expected a .npy file")
    if args.out.exists() and not args.force:
        raise EdgepruneError(f"--out {args.out} exists; pass --force to overwrite")
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        raise EdgepruneError(f"--images: no such file(s): {', '.join(missing)}")
    if args.batch_size < 1:
        raise EdgepruneError(f"--batch-size {args.batch_size}: expected an integer >= 1")
    adapter = load(args.model)
    if args.llm_layer is not None and not 1 <= args.llm_layer <= adapter.llm.config.num_hidden_layers - 1:
        raise EdgepruneError(f"--llm-layer {args.llm_layer}: expected 1 <= L <= T-1 = "
                             f"{adapter.llm.config.num_hidden_layers - 1}")
    total = None
    with torch.no_grad():
        for start in tqdm(range(0, len(args.images), args.batch_size), desc="calibrate", unit="batch",
                          disable=args.quiet):
            paths = [str(p) for p in args.images[start:start + args.batch_size]]
            if args.llm_layer is not None:
                attn = llm_prior_sum(adapter, paths, args.llm_layer, args.prompt)   # [N]
            else:
                attn = adapter.encode(adapter.preprocess(paths), need=("attn",)).attn.sum(dim=0)   # [N]
            total = attn if total is None else total + attn
    prior = (total / len(args.images)).numpy().astype(np.float32)
    atomic_write(args.out, lambda tmp: np.save(tmp, prior))
    where = f"LLM layer {args.llm_layer - 1} (in-LLM stage L={args.llm_layer})" if args.llm_layer else "encoder"
    ratios = f"max/mean {prior.max() / prior.mean():.2f}, min/mean {prior.min() / prior.mean():.2f}"
    print(f"wrote {args.out}: {where} prior over N={prior.size} tokens (grid {adapter.grid[0]}x{adapter.grid[1]}) "
          f"from {len(args.images)} images; {ratios}")
    return 0
