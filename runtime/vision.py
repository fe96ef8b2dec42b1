"""The vision graph of a bundle, on the runner that will run it: TensorRT's engine where one was built and
asked for (runtime/trt.py), ONNX Runtime otherwise. numpy + onnxruntime (+ tensorrt where present).

Rule (README, "The device path"): with `tensorrt` among the requested providers and an engine recorded in
the manifest (`edgeprune build-engine`), the default vision graph runs as engines/vision.plan through
TensorRT's Python API; the engine is checked against this device first and a mismatch is a BundleError
naming both sides. Where `tensorrt` does not import, a warning says so and ONNX Runtime runs the ONNX
graph with the resolved providers (its own TensorRT provider, when present, caches in
engines/ort-tensorrt/). Resolution buckets other than the default have no engine and run on ONNX Runtime.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edgeprune.errors import MissingDependencyError
from edgeprune.runtime.format import VISION_INPUT, Files, Keys
from edgeprune.runtime.providers import open_session, session_options

__all__ = ["OrtVision", "open_vision"]

log = logging.getLogger(__name__)


class OrtVision:
    """One vision graph on ONNX Runtime: input_shape, output_names, output_shapes, batch (None = dynamic),
    pixel_dtype, device and run(pixels) -> {name: array}."""

    def __init__(self, path: Path, providers: list, threads: int | None = None):
        self.session = open_session(path, session_options(threads), providers)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_shapes = {o.name: o.shape for o in self.session.get_outputs()}
        pixels = self.session.get_inputs()[0]
        self.input_shape = list(pixels.shape)
        self.batch = pixels.shape[0] if isinstance(pixels.shape[0], int) else None
        self.pixel_dtype = np.dtype(np.float16 if "float16" in pixels.type else np.float32)
        self.device = self.session.get_providers()[0]

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, {VISION_INPUT: pixels})))


def open_vision(bundle, file: str, providers: list, threads: int | None = None, *, use_engine: bool = False):
    """The runner of vision graph `file` of `bundle`: its TensorRT engine when `use_engine` (tensorrt was
    requested) and the manifest records one, else ONNX Runtime with the resolved `providers` (module rule)."""
    if use_engine and file == Files.VISION and bundle.manifest[Keys.ENGINE_VISION]:
        from edgeprune.runtime.trt import TrtVision

        try:
            return TrtVision(bundle)
        except MissingDependencyError as err:
            log.warning("%s; the vision graph runs on ONNX Runtime instead of the bundle's TensorRT engine", err)
    elif use_engine and file == Files.VISION:
        log.info("no TensorRT engine in %s (edgeprune build-engine makes one); the vision graph runs on ONNX "
                 "Runtime", bundle.path)
    return OrtVision(bundle.file(file), providers, threads)
