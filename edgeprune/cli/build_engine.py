"""Build a TensorRT engine of a bundle's vision graph (on the device; needs the `tensorrt` package).

Saves engines/vision.plan and a timing cache in the bundle and records them in the manifest, with the
TensorRT version and GPU the engine is tied to; `edgeprune run --provider tensorrt` then runs it.
Example: edgeprune build-engine bundles/mini-dart64 --fp16
"""
from __future__ import annotations

from pathlib import Path


def add_parser(subparsers):
    from edgeprune.cli.args import add_bundle_args, count

    p = subparsers.add_parser("build-engine", help=__doc__.splitlines()[0], description=__doc__)
    add_bundle_args(p)
    p.add_argument("--force", action="store_true", help="rebuild an engine the bundle already records")
    p.add_argument("--fp16", action="store_true", help="allow fp16 kernels")
    p.add_argument("--int8", action="store_true", help="allow int8 kernels (needs --calib-images)")
    p.add_argument("--calib-images", nargs="+", type=Path, metavar="PATH", help="images to calibrate int8 on")
    p.add_argument("--workspace", type=count, metavar="MiB", help="builder workspace limit in MiB")
    p.add_argument("--max-batch", type=count, default=4, help="largest batch of a dynamic-batch graph (default 4)")
    p.add_argument("--opt-batch", type=count, default=1, help="batch the engine is tuned for (default 1)")
    return p


def run(args) -> int:
    from edgeprune.export.engine import build_engine
    from edgeprune.runtime.format import Engine

    entry = build_engine(args.bundle, fp16=args.fp16, int8=args.int8, calib_images=args.calib_images,
                         workspace_mb=args.workspace, max_batch=args.max_batch, opt_batch=args.opt_batch,
                         force=args.force)
    print(f"built {args.bundle / entry[Engine.FILE]} (TensorRT {entry[Engine.TENSORRT_VERSION]}, "
          f"{entry[Engine.PRECISION]}, batch {entry[Engine.BATCH]}); timing cache {args.bundle / entry[Engine.TIMING_CACHE]}")
    return 0
