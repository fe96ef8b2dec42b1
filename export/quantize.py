"""Weight-only quantization of an exported float32 decoder with ONNX Runtime's own quantizer (MatMulNBits).

`quantize_decoder(folder, settings)` rewrites decoder.onnx (+ .data) in place: every MatMul with a constant weight
becomes a com.microsoft MatMulNBits (`bits`-wide blocks of `block_size` weights along the input dimension, one
scale per block, zero points when asymmetric), optionally the LM head too. Activations, norms, attention and the
KV cache stay float32.

The LM head is exported as Gemm(transB=1) over its [V, D] weight (export/decoder_ops.lm_head); it is turned into a
MatMul over the transposed weight first so the quantizer sees it, and MatMulNBits stores it as [V, k_blocks, blob]
again: rows per token, which is the layout the runtime reads embeddings from when the table is tied (stored once,
runtime/embedding.py dequantizes the rows it needs exactly as MatMulNBits does).

Measured choices (README "LLM precision"; SmolLM2-135M, the LLM of edgeprune-mini: greedy tokens of the fp32
graph on 8 real chat prompts x 24 tokens, teacher-forced through each variant: share of equal argmaxes, and the
logits' relative RMS error):
- int4 RTN: block 32 symmetric 0.77 agreement / relRMS 0.77 (84 MB); block 16: 0.77 / 0.71 (101 MB); block 64:
  0.72 / 0.85; block 128: 0.68 / 1.16; asymmetric block 32: 0.76 / 0.84; LM head left float: 0.79 (180 MB).
  HQQ (asymmetric, float zero points) block 32: 0.87 / 0.19 (101 MB).
- int8 RTN block 32 symmetric: 0.995 / 0.077 (152 MB); block 128: 0.95 / 0.13; ONNX Runtime's dynamic QDQ int8
  (quantize_dynamic, per channel) gave garbage on this graph (0.03 agreement), so int8 is MatMulNBits too.
- accuracy_level 4 (int8 activations in the kernel) vs 0: the same agreement within a token or two.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgeprune.errors import ModelError
from edgeprune.export.onnx_io import INLINE_BYTES

__all__ = ["QuantSettings", "PRESETS", "quantize_decoder", "ALGORITHMS"]

log = logging.getLogger(__name__)

ALGORITHMS = ("rtn", "hqq")   # rtn: ORT's round-to-nearest kernels (DEFAULT); hqq: half-quadratic (needs torch)


@dataclass(frozen=True)
class QuantSettings:
    bits: int                    # 4 or 8
    block_size: int = 32         # weights per scale, along the input dimension (power of 2, >= 16)
    symmetric: bool = True       # no zero points (2^(bits-1) implied)
    algorithm: str = "rtn"       # ALGORITHMS
    accuracy_level: int = 4      # MatMulNBits' compute type for the activations: 0 unset, 1 fp32, 4 int8
    lm_head: bool = True         # quantize the LM head (and so the tied embedding table) too

    def check(self) -> None:
        if self.bits not in (4, 8):
            raise ModelError(f"bits={self.bits}; expected 4 or 8")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ModelError(f"block_size={self.block_size}; expected a power of two >= 16")
        if self.algorithm not in ALGORITHMS:
            raise ModelError(f"algorithm={self.algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
        if self.algorithm == "hqq" and self.symmetric:
            raise ModelError("algorithm='hqq' fits asymmetric blocks (float zero points); pass symmetric=False")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ModelError(f"accuracy_level={self.accuracy_level}; expected 0-4")

    def record(self) -> dict:
        return {"method": "matmul_nbits", **asdict(self)}


# the --llm-precision presets (measured: module docstring)
PRESETS = {
    "int4": QuantSettings(bits=4, block_size=32, symmetric=True, algorithm="rtn", accuracy_level=4, lm_head=True),
    "int8": QuantSettings(bits=8, block_size=32, symmetric=True, algorithm="rtn", accuracy_level=4, lm_head=True),
}


def _lm_head_to_matmul(model: onnx.ModelProto) -> str | None:
    """Rewrite the LM head's Gemm(A, W[V, D], transB=1) as MatMul(A, W^T) (what the quantizer handles); returns
    the node's name, or None when the graph has no such Gemm."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Gemm" or len(node.input) != 2 or node.input[1] not in inits or attributes != {"transB": 1}:
            continue                                                         # lm_head() writes exactly this
        weight = inits[node.input[1]]
        transposed = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(weight).T), weight.name)
        weight.CopyFrom(transposed)
        node.op_type = "MatMul"
        del node.attribute[:]
        node.name = node.name or "lm_head"
        return node.name
    return None


def quantize_decoder(folder: Path, decoder_file: str, settings: QuantSettings) -> dict:
    """Quantize `folder/decoder_file` in place (module docstring). Returns the manifest's quantization record."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    settings.check()
    path = Path(folder) / decoder_file
    model = onnx.load(str(path))                                             # with its external weights
    head = _lm_head_to_matmul(model)
    exclude = [] if settings.lm_head or head is None else [head]
    if settings.algorithm == "hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=settings.block_size, bits=settings.bits)
    else:
        config = mnq.DefaultWeightOnlyQuantConfig(block_size=settings.block_size, is_symmetric=settings.symmetric,
                                                  accuracy_level=settings.accuracy_level or None,
                                                  bits=settings.bits)
    quantizer = mnq.MatMulNBitsQuantizer(model, bits=settings.bits, block_size=settings.block_size,
                                         is_symmetric=settings.symmetric,
                                         accuracy_level=settings.accuracy_level or None,
                                         nodes_to_exclude=exclude, algo_config=config)
    quantizer.process()
    quantized = quantizer.model.model
    if settings.algorithm == "hqq" and settings.accuracy_level:
        for node in quantized.graph.node:   # the HQQ path does not write the attribute itself
            if node.op_type == "MatMulNBits":
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", settings.accuracy_level))
    if head and not settings.lm_head:
        _restore_gemm(quantized, head)
    n = sum(node.op_type == "MatMulNBits" for node in quantized.graph.node)
    left = sum(node.op_type == "MatMul" for node in quantized.graph.node)
    log.info("quantized %d MatMuls to %d-bit MatMulNBits (block %d, %s, %s); %d left float", n, settings.bits,
             settings.block_size, "symmetric" if settings.symmetric else "asymmetric", settings.algorithm, left)
    data = path.with_name(path.name + ".data")
    data.unlink()
    _save(quantized, path, data.name)
    return settings.record()


def _save(model: onnx.ModelProto, path: Path, location: str) -> None:
    """Small tensors inline (shape inference reads the exporter's constants), weights in `location`; every
    MatMulNBits tensor external, however small: the runtime reads a quantized LM head's rows from the file."""
    from onnx.external_data_helper import convert_model_to_external_data, set_external_data

    convert_model_to_external_data(model, all_tensors_to_one_file=True, location=location, size_threshold=INLINE_BYTES)
    blocks = {name for node in model.graph.node if node.op_type == "MatMulNBits" for name in node.input[1:] if name}
    for tensor in model.graph.initializer:
        if tensor.name in blocks and tensor.data_location != onnx.TensorProto.EXTERNAL:
            set_external_data(tensor, location)
    onnx.save_model(model, str(path))


def _restore_gemm(model: onnx.ModelProto, head: str | None) -> None:
    """An LM head left float goes back to Gemm(transB=1) over [V, D] rows (the tied table's layout)."""
    if head is None:
        return
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.name == head and node.op_type == "MatMul" and node.input[1] in inits:
            weight = inits[node.input[1]]
            weight.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(weight).T),
                                                    weight.name))
            node.op_type = "Gemm"
            node.attribute.append(onnx.helper.make_attribute("transB", 1))
