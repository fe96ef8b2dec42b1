"""Serve a bundle behind Triton Inference Server (PyTriton) with dynamic batching and an OpenAI-compatible route.

Example: edgeprune serve bundles/mini-k64 --port 8000 --openai-port 8080
Triton's HTTP/gRPC API serves model "edgeprune" (inputs image, prompt, max_new_tokens, temperature, top_p, seed);
POST /v1/chat/completions on --openai-port takes OpenAI chat requests with an image_url data URI.
Needs the [serve] extra (nvidia-pytriton) on a Python with a shared libpython (README, Serving).
"""
from __future__ import annotations

import signal


def add_parser(subparsers):
    from edgeprune.cli.args import add_bundle_args

    p = subparsers.add_parser("serve", help=__doc__.splitlines()[0], description=__doc__)
    add_bundle_args(p)
    add_server_args(p)
    return p


def add_server_args(p, ports: bool = True) -> None:
    """Options shared by `serve` and `bench-serve` (which starts a server the same way)."""
    from edgeprune.cli.args import add_threads_arg, count, count0, port, port0
    from edgeprune.serve.protocol import Limits

    group = p.add_argument_group("server")
    if ports:
        group.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
        group.add_argument("--port", type=port, default=8000, help="Triton HTTP port (default 8000)")
        group.add_argument("--grpc-port", type=port, help="Triton gRPC port (default: --port + 1)")
        group.add_argument("--metrics-port", type=port, help="Triton metrics port (default: --port + 2)")
        group.add_argument("--openai-port", type=port0, default=8080,
                           help="port of the OpenAI-compatible /v1/chat/completions route (default 8080; 0: off)")
    group.add_argument("--max-batch", type=count, default=16, help="largest batch the dynamic batcher forms (default 16)")
    group.add_argument("--max-queue-delay-us", type=count0, default=5000,
                       help="how long a request may wait for others to batch with (default 5000 us)")
    group.add_argument("--instances", type=count, default=1, help="model instances, each its own Pipeline (default 1)")
    add_threads_arg(group, per=" per instance")
    limits = Limits()
    group.add_argument("--max-prompt-tokens", type=count, default=limits.max_prompt_tokens,
                       help=f"refuse longer prompts (default {limits.max_prompt_tokens})")
    group.add_argument("--max-new-tokens-limit", type=count, default=limits.max_new_tokens,
                       help=f"largest max_new_tokens a request may ask for (default {limits.max_new_tokens})")


def server_options(args):
    from edgeprune.errors import EdgepruneError
    from edgeprune.serve.protocol import Limits
    from edgeprune.serve.server import ServeOptions

    for name in ("max_batch", "instances", "max_prompt_tokens", "max_new_tokens_limit"):
        if getattr(args, name) < 1:
            raise EdgepruneError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected an integer >= 1")
    if args.max_queue_delay_us < 0:
        raise EdgepruneError(f"--max-queue-delay-us {args.max_queue_delay_us}: expected >= 0")
    limits = Limits(max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens_limit,
                    default_new_tokens=min(Limits().default_new_tokens, args.max_new_tokens_limit))
    ports = {k: getattr(args, k) for k in ("host", "port", "grpc_port", "metrics_port", "openai_port")
             if hasattr(args, k)}
    for name, value in ports.items():
        if name != "host" and value is not None and not 0 <= value < 65536:
            raise EdgepruneError(f"--{name.replace('_', '-')} {value}: expected a port number")
    return ServeOptions(max_batch=args.max_batch, max_queue_delay_us=args.max_queue_delay_us,
                        instances=args.instances, threads=args.threads, limits=limits, **ports)


def run(args) -> int:
    from edgeprune.serve.server import serve

    options = server_options(args)

    def stop(signum, frame):  # SIGTERM stops like Ctrl-C: PyTriton then shuts Triton down cleanly
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    serve(args.bundle, options)
    return 0
