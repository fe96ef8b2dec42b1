"""The vision graph: pixels -> encoder -> pruner (-> projector) -> K image tokens and their positions.

One ONNX graph per bundle (DESIGN.md, data flow step 3), traced from the one vision step
(models/vision_step.py): the signals asked of the encoder are the pruner's `requires`, the projector
runs after the pruner only when the pruner works in `feats` space, and every name in
`pruner.extra_outputs` becomes a graph output.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from edgeprune.export.onnx_io import export_onnx
from edgeprune.models.base import Adapter
from edgeprune.models.vision_step import vision_step
from edgeprune.pruners import PrunerLike
from edgeprune.runtime.format import VISION_DEEPSTACK, VISION_INPUT, VISION_POSITIONS, VISION_TOKENS

__all__ = ["VisionGraph", "export_vision", "vision_in_float32", "vision_tensors"]


class VisionGraph(nn.Module):
    """forward(pixels [B,3,H,W]) -> (image_tokens [B,K,D_llm], positions [B,K] int64, [deepstack_tokens
    [B,K,L,D_llm] for DeepStack models], *extras): the one vision step (models/vision_step.py) that the torch
    reference runs too."""

    def __init__(self, adapter: Adapter, pruner: PrunerLike):
        super().__init__()
        self.adapter = adapter
        self.pruner = pruner
        deepstack = [VISION_DEEPSTACK] if adapter.deepstack_layers else []
        self.output_names = [VISION_TOKENS, VISION_POSITIONS, *deepstack, *pruner.extra_outputs]

    def forward(self, pixels: torch.Tensor):
        sel = vision_step(self.adapter, self.pruner, pixels)
        return (sel.tokens, sel.positions, *(sel.extras[name] for name in self.output_names[2:]))


def example_pixels(adapter: Adapter, batch: int, seed: int = 0) -> torch.Tensor:
    """Seeded normalised-range pixels [B, 3, H, W] to trace with (values do not matter: shapes are static)."""
    h, w = adapter.preprocess_config.size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, h, w, generator=g)


def export_vision(adapter: Adapter, pruner: PrunerLike, path: str | Path, *, batch: int | None = None) -> Path:
    """Export the vision graph to `path`; `batch=None` leaves the batch dimension dynamic.

    Traced at batch 2 when dynamic, so no batch-1 special case (a Squeeze of the batch) is baked in.
    """
    graph = VisionGraph(adapter, pruner).eval()
    pixels = example_pixels(adapter, batch or 2)
    axes = None
    if batch is None:
        axes = {name: {0: "batch"} for name in (VISION_INPUT, *graph.output_names)}
    with torch.no_grad():
        shapes = [list(t.shape) for t in graph(pixels)]
    path = export_onnx(graph, (pixels,), path, input_names=[VISION_INPUT], output_names=graph.output_names,
                       dynamic_axes=axes, external_data=_large(adapter))
    _pin_output_shapes(path, shapes, dynamic_batch=batch is None)
    return path


def _pin_output_shapes(path: Path, shapes: list[list[int]], dynamic_batch: bool) -> None:
    """The legacy exporter names every output dim it cannot prove static ("GatherElements..._dim_1");
    K and D are static by construction, so write them into the graph's output types (the runtime
    and TensorRT read K from there)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for value, shape in zip(model.graph.output, shapes):
        dims = value.type.tensor_type.shape.dim
        for i, size in enumerate(shape):
            if i == 0 and dynamic_batch:
                dims[i].dim_param = "batch"
            else:
                dims[i].dim_value = int(size)
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save_model(model, str(tmp))  # external data (if any) stays where it is: same folder, same location
    os.replace(tmp, path)


def vision_tensors(adapter: Adapter) -> list[torch.Tensor]:
    """The adapter's parameters and buffers that are not the LLM's: what the vision graph holds."""
    llm = {id(t) for t in [*adapter.llm.parameters(), *adapter.llm.buffers()]}
    return [t for t in [*adapter.parameters(), *adapter.buffers()] if id(t) not in llm]


@contextmanager
def vision_in_float32(adapter: Adapter):
    """The vision graph is float32 whatever the LLM's dtype: an adapter loaded in float16 (to export a large model
    within memory) has its vision weights cast to float32 in place for the duration, and back afterwards."""
    changed = [(t, t.dtype) for t in vision_tensors(adapter) if t.is_floating_point() and t.dtype != torch.float32]
    for t, _ in changed:
        t.data = t.data.float()
    try:
        yield adapter
    finally:
        for t, dtype in changed:
            t.data = t.data.to(dtype)


def _large(adapter: Adapter) -> bool:
    """Vision weights above ~1.5 GB (as float32) must go to external data (protobuf's 2 GB limit)."""
    return sum(t.numel() * 4 for t in vision_tensors(adapter) if t.is_floating_point()) > 1_500_000_000

