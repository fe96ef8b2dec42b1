"""Serving bundles behind NVIDIA Triton Inference Server: `edgeprune serve` (PyTriton, dynamic batching, an
OpenAI-compatible route), `edgeprune triton-repo` (a model repository for a stock Triton) and `edgeprune
bench-serve` (a load test on loopback). Torch-free: the runtime, numpy and (for the server) PyTriton."""
