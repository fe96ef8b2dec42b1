"""TensorRT-safety lint for exported graphs (DESIGN.md, "TensorRT-safe graphs").

`lint(model)` returns the list of violations (empty = clean); `check(model)` raises on any.
It walks subgraphs (Loop/If/Scan bodies) too. Used on every pruner graph and on whole bundles.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import external_data_helper, numpy_helper

from edgeprune.errors import EdgepruneError

__all__ = ["lint", "check", "Violation", "LintError", "FORBIDDEN_OPS", "TOPK_LIMIT", "OPSET"]

OPSET = 17
TOPK_LIMIT = 3840  # TensorRT's largest TopK k (and the largest axis it sorts)
FORBIDDEN_OPS = {
    "NonZero": "data-dependent output shape",
    "Unique": "data-dependent output shape",
    "Compress": "data-dependent output shape",
    "EyeLike": "not implemented for bool in ONNX Runtime; build masks from arange",
}
INTEGER_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
                 onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}


class LintError(EdgepruneError):
    pass


@dataclass(frozen=True)
class Violation:
    node: str
    op: str
    rule: str

    def __str__(self) -> str:
        return f"{self.op} node '{self.node}': {self.rule}"


def _constants(graph: onnx.GraphProto, outer: dict) -> dict:
    consts = dict(outer)
    for init in graph.initializer:
        # weights in external data (a large graph, export/onnx_io.py) are never a rule's constant (a TopK k, a Loop
        # trip count): skip them rather than read gigabytes, which `to_array` cannot do without the file's folder
        if not external_data_helper.uses_external_data(init):
            consts[init.name] = numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(attr.t)
                elif attr.name in ("value_int", "value_ints"):
                    consts[node.output[0]] = onnx.helper.get_attribute_value(attr)
    return consts


def _lint_graph(graph: onnx.GraphProto, types: dict, outer_consts: dict, out: list[Violation]) -> None:
    consts = _constants(graph, outer_consts)
    for node in graph.node:
        name, op = node.name or node.output[0], node.op_type
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if op in FORBIDDEN_OPS:
            out.append(Violation(name, op, FORBIDDEN_OPS[op]))
        elif op == "TopK":
            k = consts.get(node.input[1])
            if k is None:
                out.append(Violation(name, op, "k is not a constant (dynamic K)"))
            elif int(k.reshape(-1)[0]) >= TOPK_LIMIT:
                out.append(Violation(name, op, f"k={int(k.reshape(-1)[0])}, TensorRT needs k < {TOPK_LIMIT}"))
            if attrs.get("sorted", 1) != 1:
                out.append(Violation(name, op, "sorted=0; TensorRT needs sorted=1"))
        elif op in ("ScatterND", "ScatterElements") and attrs.get("reduction", b"none") not in (b"none", "none"):
            out.append(Violation(name, op, f"reduction={attrs['reduction']!r}; scatter with reduction"))
        elif op == "CumSum" and types.get(node.input[0]) in INTEGER_TYPES:
            out.append(Violation(name, op, "integer CumSum"))
        elif op == "Loop":
            trip = node.input[0] if node.input else ""
            if not trip or trip not in consts:
                out.append(Violation(name, op, "trip count is not a constant (data-dependent Loop)"))
        for attr in node.attribute:  # subgraphs: Loop/Scan bodies, If branches
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                _lint_graph(sub, types, consts, out)


def lint(model: onnx.ModelProto | str | Path, opset: int = OPSET) -> list[Violation]:
    """All TensorRT-safety violations in `model` (a ModelProto or a path; external data not loaded)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    out: list[Violation] = []
    default_opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if default_opset != opset:
        out.append(Violation("<model>", "opset", f"opset {default_opset}, expected {opset}"))
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is a help for the CumSum rule, not a requirement
        inferred = model
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({init.name: init.data_type for init in model.graph.initializer})
    _lint_graph(model.graph, types, {}, out)
    return out


def check(model: onnx.ModelProto | str | Path, opset: int = OPSET) -> None:
    """Raise LintError listing every violation."""
    violations = lint(model, opset)
    if violations:
        listing = "\n  ".join(str(v) for v in violations)
        raise LintError(f"graph is not TensorRT-safe ({len(violations)} violation(s)):\n  {listing}")
