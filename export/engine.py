"""TensorRT engine of a bundle's vision graph (`edgeprune build-engine`), through Polygraphy's TensorRT
backend (it papers over the API differences between TensorRT 8.x on JetPack 5 and TensorRT 10).

Writes engines/vision.plan and engines/timing.cache into the bundle (the cache makes rebuilds on the
same device fast), then records the engine and the new files' sha256 in the manifest. Only the vision
graph: the LLM runs on ONNX Runtime (or TensorRT-LLM, outside edgeprune). Needs the `tensorrt`
Python package, i.e. an NVIDIA device; elsewhere it raises MissingDependencyError.
"""
from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path

import numpy as np

from edgeprune.errors import EdgepruneError, MissingDependencyError
from edgeprune.runtime.bundle import hash_files, load_bundle
from edgeprune.runtime.format import VISION_INPUT, Engine, Files, Graph, Keys, write_manifest
from edgeprune.runtime.preprocess import preprocess

__all__ = ["build_engine", "require_tensorrt"]

log = logging.getLogger(__name__)


def require_tensorrt():
    """Import and return `tensorrt`, or raise MissingDependencyError explaining where it comes from."""
    try:
        import tensorrt
    except ImportError as err:
        raise MissingDependencyError(
            f"build-engine needs TensorRT's Python package 'tensorrt', which does not import here ({err}); "
            "run it on the target device (JetPack ships TensorRT; elsewhere install edgeprune[trt] with "
            "NVIDIA's TensorRT wheels)") from err
    return tensorrt


def build_engine(bundle_dir: str | Path, *, fp16: bool = False, int8: bool = False,
                 calib_images: list | None = None, workspace_mb: int | None = None,
                 max_batch: int = 4, opt_batch: int = 1) -> dict:
    """Build the vision engine; returns the manifest entry written under `engines.vision`.

    A dynamic-batch graph gets one optimisation profile: batch 1..max_batch, tuned for opt_batch.
    int8 calibrates on `calib_images` (paths), preprocessed by the runtime's own numpy code.
    """
    trt = require_tensorrt()
    from polygraphy.backend.trt import (Calibrator, CreateConfig, Profile, engine_from_network,
                                        network_from_onnx_path, save_engine)

    if int8 and not calib_images:
        raise EdgepruneError("--int8 needs --calib-images (a few representative images to calibrate on)")
    bundle = load_bundle(bundle_dir)                   # hashes verified: never build from a tampered graph
    root = bundle.path
    graph = bundle.manifest[Keys.VISION_GRAPH]
    shape = graph[Graph.INPUTS][VISION_INPUT][Graph.SHAPE]     # ["batch" | B, 3, H, W]
    fixed = isinstance(shape[0], int)
    _, c, h, w = shape
    profiles = []
    if not fixed:
        if not 1 <= opt_batch <= max_batch:
            raise EdgepruneError(f"opt_batch={opt_batch}, max_batch={max_batch}: expected 1 <= opt <= max")
        profiles = [Profile().add(VISION_INPUT, min=(1, c, h, w), opt=(opt_batch, c, h, w), max=(max_batch, c, h, w))]
    calibrator = None
    if int8:
        batch = shape[0] if fixed else 1
        calibrator = Calibrator(_calibration_batches(calib_images, bundle.preprocess, batch),
                                cache=str(root / Files.INT8_CACHE))

    engines = root / Files.ENGINES
    engines.mkdir(exist_ok=True)
    cache = root / Files.TIMING_CACHE
    config = CreateConfig(fp16=fp16, int8=int8, profiles=profiles or None, calibrator=calibrator,
                          memory_pool_limits=({trt.MemoryPoolType.WORKSPACE: workspace_mb << 20}
                                              if workspace_mb else None),
                          load_timing_cache=str(cache) if cache.is_file() else None)
    engine = engine_from_network(network_from_onnx_path(str(root / Files.VISION)), config=config,
                                 save_timing_cache=str(cache))
    save_engine(engine, str(root / Files.VISION_ENGINE))

    entry = {Engine.FILE: Files.VISION_ENGINE, Engine.TIMING_CACHE: Files.TIMING_CACHE,
             Engine.TENSORRT_VERSION: trt.__version__, Engine.PRECISION: "int8" if int8 else "fp16" if fp16 else "fp32",
             Engine.BATCH: shape[0] if fixed else {"min": 1, "opt": opt_batch, "max": max_batch},
             Engine.BUILT: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    manifest = dict(bundle.manifest)
    manifest[Keys.ENGINE_VISION] = entry
    written = [Files.VISION_ENGINE, Files.TIMING_CACHE] + ([Files.INT8_CACHE] if int8 else [])
    manifest[Keys.FILES_SHA256] = {**manifest[Keys.FILES_SHA256], **hash_files(root, [f for f in written
                                                                                       if (root / f).is_file()])}
    write_manifest(root, manifest)
    log.info("wrote %s (%s)", root / Files.VISION_ENGINE, entry[Engine.PRECISION])
    return entry


def _calibration_batches(paths: list, config, batch: int):
    """Yields {"pixels": float32 [batch, 3, H, W]} feeds (Polygraphy's data loader protocol)."""
    paths = list(paths)
    for i in range(0, len(paths) - batch + 1, batch):
        yield {VISION_INPUT: np.ascontiguousarray(preprocess(paths[i:i + batch], config))}
