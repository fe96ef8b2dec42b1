"""TensorRT engine of a bundle's vision graph (`edgeprune build-engine`), through Polygraphy's TensorRT
backend (it papers over the API differences between TensorRT 8.x on JetPack 5 and TensorRT 10).

Writes engines/vision.plan and engines/timing.cache into the bundle (the cache makes rebuilds on the
same device fast), then records in the manifest the engine with what it is tied to (TensorRT version,
GPU name and compute capability, precision, batch profile) and the new files' sha256. The runtime uses
it with `--provider tensorrt` (runtime/trt.py) and refuses it on another device or TensorRT. Only the
vision graph: the LLM runs on ONNX Runtime (or TensorRT-LLM, outside edgeprune). Needs the `tensorrt`
Python package and polygraphy, i.e. an NVIDIA device; elsewhere it raises MissingDependencyError.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
from pathlib import Path

import numpy as np

from edgeprune.errors import EdgepruneError, MissingDependencyError
from edgeprune.runtime.bundle import bundle_lock, hash_files, load_bundle
from edgeprune.runtime.format import VISION_INPUT, Engine, Files, Graph, Keys, write_manifest
from edgeprune.runtime.preprocess import preprocess

__all__ = ["build_engine", "record_engine", "require_tensorrt"]

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
                 max_batch: int = 4, opt_batch: int = 1, force: bool = False) -> dict:
    """Build the vision engine; returns the manifest record written under `engines.vision` (format.Engine):
    the TensorRT version, GPU name and compute capability it is tied to, precision and batch profile.

    A dynamic-batch graph gets one optimisation profile: batch 1..max_batch, tuned for opt_batch.
    int8 calibrates on `calib_images` (paths), preprocessed by the runtime's own numpy code. An engine
    already recorded is replaced only with force=True. Holds the bundle's write lock (export/bundle.py), so
    it never races an export or another build-engine of the same bundle.
    """
    with bundle_lock(Path(os.path.abspath(bundle_dir))):
        return _build_engine(bundle_dir, fp16=fp16, int8=int8, calib_images=calib_images, workspace_mb=workspace_mb,
                             max_batch=max_batch, opt_batch=opt_batch, force=force)


def _build_engine(bundle_dir, *, fp16, int8, calib_images, workspace_mb, max_batch, opt_batch, force) -> dict:
    trt = require_tensorrt()
    from polygraphy.backend.trt import (Calibrator, CreateConfig, Profile, engine_from_network,
                                        network_from_onnx_path, save_engine)

    from edgeprune.runtime.trt import device_facts

    if int8 and not calib_images:
        raise EdgepruneError("--int8 needs --calib-images (a few representative images to calibrate on)")
    bundle = load_bundle(bundle_dir)                   # hashes verified: never build from a tampered graph
    root = bundle.path
    old = bundle.manifest[Keys.ENGINE_VISION]
    if old and not force:
        raise EdgepruneError(f"{root / old[Engine.FILE]}: an engine is already recorded (TensorRT "
                             f"{old.get(Engine.TENSORRT_VERSION, '?')}, {old.get(Engine.PRECISION, '?')}); pass "
                             "--force to rebuild it")
    graph = bundle.manifest[Keys.VISION_GRAPH]
    shape = graph[Graph.INPUTS][VISION_INPUT][Graph.SHAPE]     # ["batch" | B, 3, H, W]
    fixed = isinstance(shape[0], int)
    _, c, h, w = shape
    profiles = []
    if not fixed:
        if not 1 <= opt_batch <= max_batch:
            raise EdgepruneError(f"opt_batch={opt_batch}, max_batch={max_batch}: expected 1 <= opt <= max")
        profiles = [Profile().add(VISION_INPUT, min=(1, c, h, w), opt=(opt_batch, c, h, w), max=(max_batch, c, h, w))]
    device = device_facts()
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

    batch = {"min": shape[0], "opt": shape[0], "max": shape[0]} if fixed else \
        {"min": 1, "opt": opt_batch, "max": max_batch}
    entry = {Engine.FILE: Files.VISION_ENGINE, Engine.TIMING_CACHE: Files.TIMING_CACHE,
             Engine.TENSORRT_VERSION: device.tensorrt_version, Engine.GPU_NAME: device.gpu_name,
             Engine.COMPUTE_CAPABILITY: device.compute_capability,
             Engine.PRECISION: "int8" if int8 else "fp16" if fp16 else "fp32", Engine.BATCH: batch,
             Engine.BUILT: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    record_engine(root, bundle.manifest, entry, written=[Files.VISION_ENGINE, Files.TIMING_CACHE, Files.INT8_CACHE])
    log.info("wrote %s (%s, %s)", root / Files.VISION_ENGINE, entry[Engine.PRECISION], device.gpu_name)
    return entry


def record_engine(root: Path, manifest: dict, entry: dict, written: list[str]) -> dict:
    """Record `entry` under engines.vision and the sha256 of the `written` files that exist (only those:
    anything else in the folder keeps its listed hash, so a tampered graph is still caught); returns the
    manifest written."""
    manifest = dict(manifest)
    manifest[Keys.ENGINE_VISION] = entry
    present = [rel for rel in written if (root / rel).is_file()]
    manifest[Keys.FILES_SHA256] = {**manifest[Keys.FILES_SHA256], **hash_files(root, present)}
    return write_manifest(root, manifest)


def _calibration_batches(paths: list, config, batch: int):
    """Yields {"pixels": float32 [batch, 3, H, W]} feeds (Polygraphy's data loader protocol)."""
    paths = list(paths)
    for i in range(0, len(paths) - batch + 1, batch):
        yield {VISION_INPUT: np.ascontiguousarray(preprocess(paths[i:i + batch], config))}
