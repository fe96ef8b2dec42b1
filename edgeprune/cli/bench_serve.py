"""Load-test `edgeprune serve` on loopback: requests/s, p50/p99 latency and mean batch per concurrency level.

Example: edgeprune bench-serve bundles/mini-k64 --clients 1,4,16 --requests 200
Starts the server, answers W distinct requests one at a time (the references), then per level sends --requests
requests from that many concurrent clients (levels interleaved round-robin over --rounds); every answer must equal its single-request answer. The last line
reads "N requests, M lost or mismatched" (N over all levels); the exit code is 1 when M > 0.
"""
from __future__ import annotations


def add_parser(subparsers):
    from edgeprune.cli.args import add_bundle_args, count, count0, positive_float
    from edgeprune.cli.serve import add_server_args

    p = subparsers.add_parser("bench-serve", help=__doc__.splitlines()[0], description=__doc__)
    add_bundle_args(p)
    p.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated (default 1,4,16)")
    p.add_argument("--requests", type=count, default=100, help="requests per level (default 100)")
    p.add_argument("--rounds", type=count, default=3,
                   help="interleave the levels round-robin over this many rounds (default 3)")
    p.add_argument("--distinct", type=count, default=12, help="distinct (image, prompt) requests cycled (default 12)")
    p.add_argument("--max-new-tokens", type=count, default=16, help="max_new_tokens of every request (default 16)")
    p.add_argument("--time-limit", type=positive_float, default=900.0,
                   help="seconds per level; requests not answered by then count as lost (default 900)")
    p.add_argument("--bad-every", type=count0, default=0,
                   help="make every n-th request broken (corrupt image, long prompt, bad parameter); 0: none")
    p.add_argument("--server-log", help="write the server's output to this file")
    add_server_args(p, ports=False)
    return p


def run(args) -> int:
    from edgeprune.cli.serve import server_options
    from edgeprune.errors import EdgepruneError
    from edgeprune.serve.bench import BenchOptions, run_bench

    try:
        clients = tuple(int(c) for c in args.clients.split(","))
    except ValueError:
        raise EdgepruneError(f"--clients {args.clients!r}: expected integers separated by commas") from None
    if args.distinct < 1 or args.max_new_tokens < 1 or args.bad_every < 0 or args.time_limit <= 0:
        raise EdgepruneError("--distinct and --max-new-tokens must be >= 1, --bad-every >= 0, --time-limit > 0")
    limits = server_options(args).limits  # checks the server options here, before starting anything
    server_args = ["--max-batch", str(args.max_batch), "--max-queue-delay-us", str(args.max_queue_delay_us),
                   "--instances", str(args.instances), "--max-prompt-tokens", str(args.max_prompt_tokens),
                   "--max-new-tokens-limit", str(args.max_new_tokens_limit)]
    if args.threads:
        server_args += ["--threads", str(args.threads)]
    options = BenchOptions(clients=clients, requests=args.requests, rounds=args.rounds, distinct=args.distinct,
                           max_new_tokens=args.max_new_tokens, time_limit_s=args.time_limit,
                           bad_every=args.bad_every, server_args=tuple(server_args), limits=limits)
    return 1 if run_bench(args.bundle, options, log_path=args.server_log) else 0
