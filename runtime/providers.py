"""ONNX Runtime execution providers by short name: cpu always; cuda and tensorrt where present."""
from __future__ import annotations

import logging
from pathlib import Path

from edgeprune.errors import BundleError, EdgepruneError
from edgeprune.runtime.checks import check_count

__all__ = ["PROVIDERS", "requested_providers", "resolve_providers", "provider_names", "session_options", "open_session",
           "check_threads"]

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def requested_providers(names: list | None = None) -> list[str]:
    """The short names asked for (short or full ORT names accepted), in order; ["cpu"] when none.
    An unknown name is an error naming the choices."""
    short = {full: name for name, full in PROVIDERS.items()}
    if isinstance(names, str):                    # one name, not its letters
        names = [names]
    if names is not None and not isinstance(names, (list, tuple)):
        raise EdgepruneError(f"providers={names!r}: expected a list of names ({', '.join(PROVIDERS)})")
    out = []
    for name in names or ["cpu"]:
        if isinstance(name, tuple) and len(name) == 2 and isinstance(name[1], dict):  # a resolved (name, options)
            name = name[0]
        if not isinstance(name, str):
            raise EdgepruneError(f"provider {name!r}: expected a name, one of {', '.join(PROVIDERS)}")
        key = name.lower() if name.lower() in PROVIDERS else short.get(name)
        if key is None:
            raise EdgepruneError(f"unknown provider {name!r}; expected one of {', '.join(PROVIDERS)}")
        if key not in out:
            out.append(key)
    return out


def provider_names(providers: list) -> list[str]:
    """Full ORT names of a resolved providers list (entries are names or (name, options) pairs)."""
    return [p if isinstance(p, str) else p[0] for p in providers]


def resolve_providers(names: list | None = None, cache_dir: str | Path | None = None) -> list:
    """Short names (or full ORT names) in priority order -> the `providers` list for InferenceSession.

    Idempotent: a resolved list comes back unchanged, so a pipeline resolves once and hands the result to
    every graph. CPU is always last, the fallback. A provider this onnxruntime build lacks is skipped with a
    warning (install onnxruntime-gpu on the device for cuda/tensorrt). TensorRT brings CUDA right after it
    when the build has CUDA: ORT hands the nodes TensorRT cannot run (the LLM's fused attention) to the next
    provider, which would otherwise be the CPU. With `cache_dir` (the bundle's engines/ort-tensorrt), ORT's
    TensorRT provider keeps its engines and timing cache there, so the second start is fast; a folder that
    cannot be created (a read-only bundle) only costs the cache, with a warning.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = requested_providers(names)
    names = [names] if isinstance(names, str) else names
    resolved = {p[0]: p for p in names or [] if isinstance(p, tuple)}     # keep the options of resolved pairs
    if "tensorrt" in wanted and "cuda" not in wanted:
        wanted.insert(wanted.index("tensorrt") + 1, "cuda")
    out: list = []
    for name in wanted:
        full = PROVIDERS[name]
        if name == "cpu":
            continue                # appended last below: it is the fallback, never ahead of a GPU
        if full not in available:
            if name in requested_providers(names):
                log.warning("provider %s is not in this onnxruntime build (available: %s; install onnxruntime-gpu "
                            "for cuda/tensorrt); skipped", full, ", ".join(available))
            continue
        if full in resolved:
            out.append(resolved[full])
        elif name == "tensorrt" and cache_dir is not None and _writable(Path(cache_dir)):
            out.append((full, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
                               "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache_dir)}))
        else:
            out.append(full)
    return out + [PROVIDERS["cpu"]]


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return True
    except OSError as err:
        log.warning("%s: cannot create ONNX Runtime's TensorRT cache there (%s); engines are rebuilt at every start",
                    folder, err)
        return False


def check_threads(threads) -> int | None:
    """None (ONNX Runtime's choice) or an integer >= 1."""
    return None if threads is None else check_count("threads", threads)


def session_options(threads: int | None = None, spin: bool = True):
    """ORT session options. spin=False: the intra-op pool's threads sleep as soon as a call ends instead of
    spinning for work; with several sessions on few cores (a benchmark's many systems, run round-robin) a
    finished session's spinning threads otherwise take the cores of the next one."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if check_threads(threads):
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # warnings about unused initializers etc. are noise to a user
    return opts


def open_session(path: Path, options, providers: list):
    """An onnxruntime InferenceSession of a bundle's graph; a file ONNX Runtime cannot load (truncated, missing
    external data) is a BundleError naming it."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:  # onnxruntime raises its own (non-Edgeprune) errors for a broken file
        raise BundleError(f"{path}: onnxruntime cannot load it ({str(err).splitlines()[0] if str(err) else err!r})") \
            from err
