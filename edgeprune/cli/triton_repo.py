"""Write a Triton model repository (config.pbtxt + model.py + the bundle) for a stock Triton server or container.

Example: edgeprune triton-repo bundles/mini-k64 --out triton-models --max-batch 16 --instances 1
Then: tritonserver --model-repository=triton-models (REPO/README.md has the docker command). The repository
vendors the torch-free runtime: the server needs numpy, onnxruntime, tokenizers, pillow, pyyaml and psutil.
"""
from __future__ import annotations

from pathlib import Path


def add_parser(subparsers):
    from edgeprune.cli.args import add_bundle_args, count, count0

    p = subparsers.add_parser("triton-repo", help=__doc__.splitlines()[0], description=__doc__)
    add_bundle_args(p)
    p.add_argument("--out", type=Path, required=True, help="repository folder to write")
    p.add_argument("--force", action="store_true", help="replace a repository written earlier by this command")
    p.add_argument("--max-batch", type=count, default=16, help="largest batch the dynamic batcher forms (default 16)")
    p.add_argument("--max-queue-delay-us", type=count0, default=5000,
                   help="how long a request may wait for others to batch with (default 5000 us)")
    p.add_argument("--instances", type=count, default=1, help="model instances (instance_group count, default 1)")
    p.add_argument("--provider", action="append", metavar="NAME",
                   help="ONNX Runtime provider, repeatable, in priority order (cpu, cuda, tensorrt; default cpu)")
    p.add_argument("--threads", type=count0, default=0, help="ORT intra-op threads per instance (default 0: ORT's)")
    return p


def run(args) -> int:
    from edgeprune.serve.repo import RepoOptions, write_repo

    options = RepoOptions(max_batch=args.max_batch, max_queue_delay_us=args.max_queue_delay_us,
                          instances=args.instances, providers=tuple(args.provider or ["cpu"]), threads=args.threads)
    out = write_repo(args.bundle, args.out, options, force=args.force)
    print(f"wrote {out}: model 'edgeprune' (config.pbtxt, 1/model.py, 1/bundle); start it with "
          f"tritonserver --model-repository={out} (see {out / 'README.md'})")
    return 0
