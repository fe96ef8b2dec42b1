"""One way to turn a torch module into an ONNX file: the TorchScript exporter at opset 17, weights streamed.

Why not dynamo: torch 2.13's dynamo exporter emits opset 18 and its down-conversion to 17 fails on
Reduce* ops (NOTES.md); opset 17 is what every Jetson TensorRT accepts.

Why the weights are not left to the exporter: with `export_params=True` it holds the module's weights, a
constant-folded copy of every transposed matrix and the serialised model at once (about 3x the graph's weights
on top of the model), then `onnx.load` of the result a fourth copy: a 2-4B model cannot be exported on a 24 GB
machine that way. So the module is traced without weights (`export_params=False`: they are graph inputs named
by their parameter / buffer names), and `_fold_and_write` does the constant folding here, node by node in graph
order: nodes whose inputs are all constant (weights, Constant nodes, earlier folded values) are evaluated with
onnx's reference evaluator, a value is dropped after its last constant consumer, and every constant a remaining
node reads becomes an initializer, written to the external data file as soon as it exists. The weights are
read through numpy views of the torch tensors (no copy); the only copies are the folded values, one at a time.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from edgeprune.export.lint import OPSET
from edgeprune.runtime.format import Graph
from edgeprune.runtime.format import external_data as data_file

__all__ = ["export_onnx", "graph_io"]

INLINE_BYTES = 1024   # initializers up to this size stay inside the .onnx file (as onnx's save_model does)


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
                              dynamic_axes=dynamic_axes or {}, export_params=False, do_constant_folding=False)
        model = onnx.load(str(raw))                                  # the graph only: no weights in it
        weights = {name: t for name, t in [*module.named_parameters(remove_duplicate=False),
                                             *module.named_buffers(remove_duplicate=False)]}
        final = Path(tmp) / path.name
        data = final.with_name(data_file(path.name)) if external_data else None
        _fold_and_write(model, weights, set(input_names), data)
        onnx.save_model(model, str(final))
        if data is not None:
            os.replace(data, path.with_name(data.name))
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


def _array(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a weight (no copy; bfloat16 has no numpy type and is widened)."""
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.contiguous().numpy()


def _fold_and_write(model: onnx.ModelProto, weights: dict[str, torch.Tensor], user_inputs: set[str],
                    data: Path | None) -> None:
    """Turn the weight inputs of `model` into initializers, folding every all-constant node on the way (module
    docstring). Large initializers are appended to `data` (external data) when given, else kept inline."""
    graph = model.graph
    params = [i.name for i in graph.input if i.name not in user_inputs]
    unknown = [name for name in params if name not in weights]
    assert not unknown, f"graph inputs that are neither user inputs nor weights: {unknown}"
    constant = set(params)
    foldable = []                                                      # per node: fold it?
    for node in graph.node:
        fold = node.domain in ("", "ai.onnx") and all(not x or x in constant for x in node.input) \
            and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
        foldable.append(fold)
        if fold:
            constant.update(node.output)
    # how many folded nodes still read each constant, and which constants the graph itself needs
    readers: dict[str, int] = {}
    needed = {o.name for o in graph.output if o.name in constant}
    for node, fold in zip(graph.node, foldable):
        for x in node.input:
            if x in constant:
                if fold:
                    readers[x] = readers.get(x, 0) + 1
                else:
                    needed.add(x)

    values: dict[str, np.ndarray] = {}
    initializers: list[onnx.TensorProto] = []
    writer = open(data, "wb") if data is not None else None
    try:
        def emit(name: str, value: np.ndarray) -> None:
            initializers.append(_tensor(name, value, writer, data))

        for name in params:                                            # weights the graph reads directly
            if name in needed:
                emit(name, _array(weights[name]))
        kept = []
        for node, fold in zip(graph.node, foldable):
            if not fold:
                kept.append(node)
                continue
            feeds = {x: values[x] if x in values else _array(weights[x]) for x in node.input if x}
            for name, value in zip(node.output, _evaluate(node, feeds, model.opset_import)):
                if name in needed:
                    emit(name, value)
                if readers.get(name):
                    values[name] = value
            for x in node.input:                                       # drop what no folded node reads any more
                if x in readers:
                    readers[x] -= 1
                    if readers[x] == 0:
                        values.pop(x, None)
    finally:
        if writer is not None:
            writer.close()
    del graph.node[:]
    graph.node.extend(kept)
    inputs = [i for i in graph.input if i.name in user_inputs]
    del graph.input[:]
    graph.input.extend(inputs)
    graph.initializer.extend(initializers)
    used = {x for node in kept for x in node.input} | {o.name for o in graph.output}
    values_info = [v for v in graph.value_info if v.name in used]
    del graph.value_info[:]
    graph.value_info.extend(values_info)


def _evaluate(node: onnx.NodeProto, feeds: dict[str, np.ndarray], opsets) -> list[np.ndarray]:
    """Run one node with onnx's reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for name, v in feeds.items()]
    outputs = [helper.make_empty_tensor_value_info(name) for name in node.output if name]
    one = helper.make_model(helper.make_graph([node], "fold", inputs, outputs), opset_imports=list(opsets))
    return [np.asarray(v) for v in ReferenceEvaluator(one).run(None, feeds)]


def _tensor(name: str, value: np.ndarray, writer, data: Path | None) -> onnx.TensorProto:
    """An initializer: inline when small or without a data file, else appended to it (external data)."""
    value = np.asarray(value, order="C")   # (not ascontiguousarray: it turns 0-d arrays into 1-d)
    if writer is None or value.nbytes <= INLINE_BYTES:
        return numpy_helper.from_array(value, name)
    tensor = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(value.dtype), dims=value.shape)
    offset = writer.tell()
    writer.write(memoryview(value.reshape(-1)).cast("B"))            # the array's own buffer: no copy
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, val in (("location", data.name), ("offset", str(offset)), ("length", str(value.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, val
    return tensor
