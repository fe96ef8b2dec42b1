"""A pruner alone as an ONNX graph: its required signals in, (tokens, positions, *extras) out.

Used by the parity tests and the pruner benchmark; the vision graph wraps pruners the same way.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edgeprune.export.onnx_io import export_onnx
from edgeprune.pruners import Pruner

__all__ = ["PrunerGraph", "export_pruner"]


class PrunerGraph(nn.Module):
    """Positional-input wrapper: forward(*tensor_signals) in `pruner.requires` order (grid is static)."""

    def __init__(self, pruner: Pruner, grid: tuple[int, int] | None):
        super().__init__()
        self.pruner = pruner
        self.grid = grid
        self.input_names = [s for s in pruner.requires if s != "grid"]
        self.output_names = ["selected_tokens", "positions", *pruner.extra_outputs]

    def forward(self, *signals: torch.Tensor):
        sel = self.pruner(**dict(zip(self.input_names, signals)), grid=self.grid)
        return (sel.tokens, sel.positions, *(sel.extras[name] for name in self.pruner.extra_outputs))


def export_pruner(pruner: Pruner, signals: dict, path: str | Path, dynamic_batch: bool = True) -> Path:
    """Export `pruner` traced on `signals` (a dict of example tensors, plus 'grid') to `path`."""
    graph = PrunerGraph(pruner, signals.get("grid"))
    args = tuple(signals[name] for name in graph.input_names)
    axes = {name: {0: "batch"} for name in graph.input_names + graph.output_names} if dynamic_batch else None
    return export_onnx(graph, args, path, input_names=graph.input_names, output_names=graph.output_names,
                       dynamic_axes=axes)
