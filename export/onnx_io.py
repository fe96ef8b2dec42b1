"""One way to turn a torch module into an ONNX file: the TorchScript exporter at opset 17.

Why not dynamo: torch 2.13's dynamo exporter emits opset 18 and its down-conversion to 17 fails on
Reduce* ops (NOTES.md); opset 17 is what every Jetson TensorRT accepts.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from edgeprune.export.lint import OPSET
from edgeprune.runtime.format import Graph
from edgeprune.runtime.format import external_data as data_file

__all__ = ["export_onnx", "graph_io"]


def export_onnx(module: torch.nn.Module, args: tuple, path: str | Path, *, input_names: list[str],
                output_names: list[str], dynamic_axes: dict | None = None,
                external_data: bool = False) -> Path:
    """Export `module(*args)` to `path` at opset 17 and return the path.

    The file appears atomically (exported to a temp dir in the same folder, then renamed). With
    `external_data`, weights go to `<name>.data` beside it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about Python ints are expected: shapes are static
            torch.onnx.export(module.eval(), args, str(raw), opset_version=OPSET, dynamo=False,
                              input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes or {}, do_constant_folding=True)
        model = onnx.load(str(raw))
        final = Path(tmp) / path.name
        if external_data:
            onnx.save_model(model, str(final), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_file(path.name), size_threshold=1024)
            os.replace(final.with_name(data_file(path.name)), path.with_name(data_file(path.name)))
        else:
            onnx.save_model(model, str(final))
        os.replace(final, path)
    return path


def graph_io(path: str | Path) -> dict:
    """The inputs and outputs of an ONNX file as a format.Graph record without the file:
    {"inputs": {name: {"shape", "dtype"}}, "outputs": {...}} (dims: int, or the dynamic axis' name)."""
    model = onnx.load(str(path), load_external_data=False)

    def describe(values) -> dict:
        out = {}
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
            out[v.name] = {Graph.SHAPE: shape, Graph.DTYPE: onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name}
        return out

    initializers = {i.name for i in model.graph.initializer}
    return {Graph.INPUTS: describe(v for v in model.graph.input if v.name not in initializers),
            Graph.OUTPUTS: describe(model.graph.output)}
