"""ONNX Runtime execution providers by short name: cpu always; cuda and tensorrt where present."""
from __future__ import annotations

import logging
from pathlib import Path

from edgeprune.errors import EdgepruneError

__all__ = ["PROVIDERS", "resolve_providers", "session_options"]

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def resolve_providers(names: list | None = None, cache_dir: str | Path | None = None) -> list:
    """Short names (or full ORT names) in priority order -> the `providers` list for InferenceSession.

    Idempotent: an already resolved list (full names, (name, options) pairs) comes back unchanged, so a
    pipeline resolves once and hands the result to every graph. CPU is always appended last as the fallback. A provider this onnxruntime build lacks is skipped
    with a warning (install onnxruntime-gpu on the device for cuda/tensorrt); an unknown name is an error. With `cache_dir`, TensorRT keeps
    its engines and timing cache there (the bundle's engines/ folder), so the second start is fast.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    out: list = []
    for name in names or ["cpu"]:
        if isinstance(name, tuple):   # (full name, options): resolved before
            if name[0] not in [p if isinstance(p, str) else p[0] for p in out]:
                out.append(name)
            continue
        full = PROVIDERS.get(name.lower(), name)
        if full not in PROVIDERS.values():
            raise EdgepruneError(f"unknown provider {name!r}; expected one of {', '.join(PROVIDERS)}")
        if full == PROVIDERS["cpu"]:
            continue                # appended last below: it is the fallback, never ahead of a GPU
        if full not in available:  # same rule as runtime/llm.py: skip with a warning, CPU stays
            log.warning("provider %s is not in this onnxruntime build (available: %s; install onnxruntime-gpu "
                        "for cuda/tensorrt); skipped", full, ", ".join(available))
            continue
        if full == PROVIDERS["tensorrt"] and cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            out.append((full, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
                               "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache_dir)}))
        elif full not in [p if isinstance(p, str) else p[0] for p in out]:
            out.append(full)
    return out + [PROVIDERS["cpu"]]


def session_options(threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # warnings about unused initializers etc. are noise to a user
    return opts
