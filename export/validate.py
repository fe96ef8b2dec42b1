"""Checks run at export: the ONNX checker and TensorRT lint on every graph, and ORT-vs-torch parity
of the vision graph on seeded images (the LLM's parity comes from export_llm's own validation).

Results are plain dicts (stored in the manifest under `validation`, printed by the CLI).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from edgeprune.errors import EdgepruneError
from edgeprune.export import lint
from edgeprune.export.vision import VisionGraph
from edgeprune.models.base import Adapter
from edgeprune.pruners import Pruner
from edgeprune.runtime.format import VISION_DEEPSTACK, VISION_INPUT, VISION_POSITIONS, VISION_TOKENS

__all__ = ["ParityError", "check_graph", "seeded_images", "validate_vision", "TOLERANCE"]

# max |ORT - torch| of image tokens accepted, per graph dtype (fp32 kernels differ in summation order)
TOLERANCE = {"float32": 1e-3, "float16": 5e-2}


class ParityError(EdgepruneError):
    """The exported graph disagrees with torch beyond tolerance."""


def check_graph(path: str | Path) -> None:
    """onnx.checker (full check, with shape inference) and the TensorRT-safety lint on one graph."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as err:
        raise EdgepruneError(f"{path}: onnx checker failed: {err}") from err
    lint.check(str(path))


def seeded_images(size: tuple[int, int], count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` seeded uint8 HxWx3 images: smooth colour blobs plus noise, a little larger than `size`
    so the resize and crop of preprocessing run too. Not white noise: attention and similarity then
    have real structure and no flat near-ties."""
    h, w = size[0] + 24, size[1] + 40
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.zeros((h, w, 3), np.float32)
        for _blob in range(6):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.1, 0.4) * min(h, w)
            mask = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
            img += mask * rng.uniform(0, 255, size=3).astype(np.float32)
        img += rng.normal(0, 12, size=img.shape)
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    return images


def validate_vision(adapter: Adapter, pruner: Pruner, path: str | Path, *, batch: int | None = None,
                    count: int = 2, seed: int = 0, dtype: str = "float32") -> dict:
    """Run `count` seeded images through torch and through ORT (as one batch of `batch or count`).

    Returns {"images", "batch", "positions_equal", "positions_mismatch_rows", "max_abs_diff",
    "extras_max_abs_diff", "tolerance", "passed"}. Positions must be identical; image tokens (and DeepStack
    features) within TOLERANCE[dtype].
    """
    import onnxruntime as ort

    b = batch or count
    images = seeded_images(adapter.preprocess_config.size, b, seed)
    pixels = adapter.preprocess(images).float()                          # [B, 3, H, W]
    graph = VisionGraph(adapter, pruner).eval()
    with torch.no_grad():
        expected = [t.float().numpy() if t.is_floating_point() else t.numpy() for t in graph(pixels)]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed_type = np.float16 if "float16" in session.get_inputs()[0].type else np.float32
    got = session.run(graph.output_names, {VISION_INPUT: pixels.numpy().astype(feed_type)})
    names = graph.output_names
    ref, out = dict(zip(names, expected)), dict(zip(names, got))
    rows_off = [int(i) for i in np.flatnonzero((ref[VISION_POSITIONS] != out[VISION_POSITIONS]).any(axis=1))]
    same_rows = [i for i in range(b) if i not in rows_off]
    # token differences are only meaningful on rows that kept the same tokens (DeepStack features count too)
    diff = max(float(np.abs(ref[name][same_rows] - out[name].astype(np.float32)[same_rows]).max())
               for name in (VISION_TOKENS, VISION_DEEPSTACK) if name in ref) if same_rows else None
    extras = {name: float(np.abs(np.asarray(ref[name], np.float64) - np.asarray(out[name], np.float64)).max())
              for name in pruner.extra_outputs}
    tol = TOLERANCE[dtype]
    return {
        "images": b, "seed": seed, "positions_equal": not rows_off, "positions_mismatch_rows": rows_off,
        "max_abs_diff": diff, "extras_max_abs_diff": extras, "tolerance": tol,
        "passed": not rows_off and diff is not None and diff <= tol,
    }
