"""`edgeprune serve`: a bundle behind NVIDIA Triton Inference Server (through PyTriton, the `[serve]` extra), with
Triton's dynamic batcher, plus an OpenAI-compatible /v1/chat/completions route in front of it (serve/openai.py).

PyTriton starts a real Triton server (HTTP, gRPC, metrics) whose model forwards each batch of requests to
`Engine.infer` in this process. PyTriton answers a whole batch or fails it whole, so a request that fails on its
own comes back with its `error` output set (protocol.OUTPUTS), and the other requests of its batch are answered.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from edgeprune.errors import MissingDependencyError
from edgeprune.serve.engine import Engine
from edgeprune.serve.protocol import INPUTS, MODEL_NAME, OUTPUTS, Limits

__all__ = ["ServeOptions", "serve", "import_pytriton"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000                    # Triton HTTP; gRPC on port + 1, metrics on port + 2 unless given
    grpc_port: int | None = None
    metrics_port: int | None = None
    openai_port: int | None = 8080      # 0 or None: no OpenAI route
    max_batch: int = 16
    max_queue_delay_us: int = 5000
    instances: int = 1
    threads: int | None = None
    limits: Limits = Limits()


def import_pytriton():
    try:
        import pytriton.triton  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError(f"serving needs PyTriton ({err}): pip install 'edgeprune[serve]' in an "
                                     "environment built on a Python with its own shared libpython (README, Serving: "
                                     "Debian's python3.11 with libpython3.11)") from None
    from edgeprune.serve.libpython import problem

    reason = problem()
    if reason:
        raise MissingDependencyError(f"Triton's Python backend cannot run on this Python: {reason}")
    import pytriton
    return pytriton


def _infer_fn(engine: Engine):
    def infer(requests):
        return engine.infer([dict(request) for request in requests])
    return infer


def serve(bundle: str | Path, options: ServeOptions = ServeOptions(), ready=None) -> None:
    """Serve until interrupted. `ready(urls)` is called once Triton (and the OpenAI route) accept requests."""
    import_pytriton()
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    from edgeprune.serve.openai import start_openai_server

    engines = [Engine(bundle, options.limits, threads=options.threads) for _ in range(options.instances)]
    config = TritonConfig(http_address=options.host, http_port=options.port, grpc_address=options.host,
                          grpc_port=options.grpc_port or options.port + 1, metrics_address=options.host,
                          metrics_port=options.metrics_port or options.port + 2, exit_on_error=True)
    with Triton(config=config) as triton:
        triton.bind(
            model_name=MODEL_NAME,
            infer_func=[_infer_fn(engine) for engine in engines],   # one model instance per engine
            inputs=[Tensor(name=n, dtype=t, shape=s, optional=o) for n, t, s, o in INPUTS],
            outputs=[Tensor(name=n, dtype=t, shape=s) for n, t, s in OUTPUTS],
            config=ModelConfig(max_batch_size=options.max_batch,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=options.max_queue_delay_us)),
            strict=False,
        )
        triton.run()
        urls = {"triton_http": f"http://{options.host}:{options.port}"}
        openai = None
        if options.openai_port:
            openai = start_openai_server(options.host, options.openai_port, urls["triton_http"])
            urls["openai"] = f"http://{options.host}:{options.openai_port}/v1"
        print(f"edgeprune serve: {bundle} (K={engines[0].keep}) ready: "
              + ", ".join(f"{k} {v}" for k, v in urls.items()), flush=True)
        if ready:
            ready(urls)
        try:
            triton.serve()
        finally:
            if openai:
                openai.shutdown()
    sys.stdout.flush()
