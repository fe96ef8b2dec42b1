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

__all__ = ["export_onnx"]


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
                            location=path.name + ".data", size_threshold=1024)
            os.replace(final.with_name(path.name + ".data"), path.with_name(path.name + ".data"))
        else:
            onnx.save_model(model, str(final))
        os.replace(final, path)
    return path
