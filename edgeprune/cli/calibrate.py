"""Calibrate D2Pruner's positional prior: the mean encoder attention over a set of images.

Example: edgeprune calibrate --model edgeprune-mini --images photos/*.jpg --out mini-bias.npy
then:    edgeprune export --method d2pruner --keep 64 --cfg bias=mini-bias.npy --out bundles/mini-d2
The prior ([N] float32, METHODS.md D2Pruner step 1) is baked into the vision graph as a constant and
stored in the bundle; a prior of another grid size is resized by bilinear interpolation.
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
    return p


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
    total = None
    with torch.no_grad():
        for start in tqdm(range(0, len(args.images), args.batch_size), desc="calibrate", unit="batch",
                          disable=args.quiet):
            pixels = adapter.preprocess([str(p) for p in args.images[start:start + args.batch_size]])
            attn = adapter.encode(pixels, need=("attn",)).attn.sum(dim=0)          # [N]
            total = attn if total is None else total + attn
    prior = (total / len(args.images)).numpy().astype(np.float32)
    atomic_write(args.out, lambda tmp: np.save(tmp, prior))
    print(f"wrote {args.out}: prior over N={prior.size} tokens (grid {adapter.grid[0]}x{adapter.grid[1]}) from "
          f"{len(args.images)} images; max/mean {prior.max() / prior.mean():.2f}, min/mean {prior.min() / prior.mean():.2f}")
    return 0
