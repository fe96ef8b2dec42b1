"""Weight-only quantization of an exported float32 decoder to ONNX Runtime's MatMulNBits.

`quantize_decoder(folder, settings)` rewrites decoder.onnx (+ .data) in place: every MatMul with a constant weight
becomes a com.microsoft MatMulNBits (`bits`-wide codes in blocks of `block_size` weights along the input dimension,
one float32 scale per block, integer zero points when asymmetric), optionally the LM head too. Activations, norms,
attention and the KV cache stay float32.

Algorithms (QuantSettings.algorithm):
- "minmax" (the int4 preset): each block keeps its minimum, as llama.cpp's Q4_1 does: scale = (max - min) /
  (2^bits - 1), code = round((w - min) / scale), w ~ code * scale + min. MatMulNBits has integer zero points only
  (a float zero point runs ONNX Runtime's slow unpacked path: HQQ below), so the minimum is split: the zero point
  z = round(-min / scale) carries it up to a fraction of a step, and the rest r = min + z * scale (|r| <= scale / 2)
  is added through the input: x' = concat(x, x @ sums), where `sums` [K, S] (0/1) repeats the per-block sums of x
  once per digit, and each digit is a block row of codes holding r (column-wise scale; digit i+1 holds what digit i
  rounded off). y = x' @ W' is then sum over blocks of scale * (x . (code - z)) + r * sum(x) = x @ W to the
  digits' precision. One MatMulNBits per weight, plus one MatMul and one Concat per distinct input (QKV, o_proj,
  gate/up, down: 4 per layer); K grows by min_digits x 32 rows (K = 576: +11% at 2 digits, K = 1536: +8%).
  A weight that already lies on such a grid (edgeprune-mini's SmolLM2 ships as a Q4_1 GGUF) is kept to ~3e-4 of
  its output at 2 digits (tests/export/test_quantize.py); any other weight gets the Q4_1 fit.
- "rtn": ONNX Runtime's round-to-nearest (matmul_nbits_quantizer's default), symmetric (no zero points) or not.
- "hqq": ONNX Runtime's HQQ (float zero points).
The LM head (and so a tied embedding table) is quantized on its own, symmetric at lm_head_bits (absmax / (2^(b-1)
- 1) scales, no zero points: llama.cpp's Q8_0 at 8 bits, so SmolLM2's Q8_0 table is kept exactly), or left float.
With lm_head_shortlist = k (the int4 preset: 64) an 8-bit head is not multiplied whole: a 4-bit draft of it
(symmetric, half the bytes) scores every row, and only its k highest rows are recomputed, in float32, from the
8-bit rows (GatherBlockQuantized): logits = ScatterElements(draft, top-k ids, x . rows). The k rescored logits are
the 8-bit head's; greedy decoding picks the 8-bit head's token unless that token ranks below k in the draft (on
SmolLM2, 371 greedy steps of 10 text prompts: the 8-bit argmax ranked 0-8 in the draft (block 64), while the
draft's own argmax differed in 21 % of the steps); sampling sees draft values outside the k. A head with a bias
is left whole.

The LM head is exported as Gemm(transB=1) over its [V, D] weight (export/decoder_ops.lm_head); it is turned into a
MatMul over the transposed weight first, and MatMulNBits stores it as [V, k_blocks, blob] again: rows per token,
which is the layout the runtime reads embeddings from when the table is tied (stored once, runtime/embedding.py
dequantizes the rows it needs exactly as MatMulNBits does).

Measured choices (docs/llm_precision.md; SmolLM2-135M, the LLM of edgeprune-mini, whose weights are the Q4_1 /
Q8_0 blocks of its GGUF):
- weights' relative RMS error: symmetric RTN block 32 8.5-8.8%, asymmetric RTN / integer zero point 8.2%, block
  16 7.7%; minmax 1 digit 0.67%, 2 digits 0.05%. Every 4-bit format without the float minimum re-quantizes the
  Q4_1 blocks (twice-rounded weights); ONNX Runtime GenAI's int4 model of SmolLM2 has bit-identical blocks to
  symmetric RTN block 32.
- edgeprune-mini exact match (edgeprune eval, divprune K=64, n=300; fp32 0.633): minmax int4 (2 digits, 8-bit
  head) 0.630, answers equal to fp32's 0.977 (unpruned, n=100: 0.670 vs 0.660); symmetric RTN int4 0.277; HQQ 0.587
  (but ~30x slower decode: float zero points); int8 RTN 0.637. Head symmetric 4-bit with exact layers (torch
  simulation, n=100): 0.910 of the answers equal to fp32's, so the preset keeps it 8-bit.
- decode (1 thread, loaded machine, interleaved): minmax 2 digits 17.5 ms/token, 1 digit 16.2, symmetric RTN 14.8,
  fp32 38.8: the 8-bit head, the minima rows and 240 more small kernels per step cost 10-20%.
- int8 RTN block 32 symmetric: 0.995 text agreement / relRMS 0.077 (152 MB); ONNX Runtime's dynamic QDQ int8
  (quantize_dynamic, per channel) gave garbage on this graph (0.03 agreement), so int8 is MatMulNBits too.
- accuracy_level 4 (int8 activations in the kernel) vs 1: the same agreement within a token or two, faster decode.
- lm_head_shortlist 64: a decode step at 130 tokens of context in 8.6 instead of 10.0 ms of kernels (ORT profiler,
  1 thread): the draft reads 14 MB per token instead of 28; TopK, the gather and the rescoring cost 0.15 ms.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgeprune.errors import ModelError
from edgeprune.export.onnx_io import INLINE_BYTES
from edgeprune.runtime.format import external_data

__all__ = ["QuantSettings", "PRESETS", "quantize_decoder", "ALGORITHMS", "SHORTLIST", "MIN_ORT_SHORTLIST"]

log = logging.getLogger(__name__)

ALGORITHMS = ("minmax", "rtn", "hqq")   # module docstring; minmax is the int4/int8 presets'
SHORTLIST = "lm_head_shortlist"        # name prefix of the draft head's nodes and tensors
MIN_ORT_SHORTLIST = "1.23"             # GatherBlockQuantized over 8-bit uint8 rows (onnxruntime PR 25214)
# the draft head's block: its ranking only has to keep the 8-bit argmax in its top k. SmolLM2, 371 greedy steps:
# the 8-bit argmax ranked at most 6 / 8 / 12 in drafts of block 32 / 64 / 128 (3.5 / 1.8 / 0.9 MB of scales)
DRAFT_BLOCK = 64


@dataclass(frozen=True)
class QuantSettings:
    bits: int                    # 4 or 8
    block_size: int = 32         # weights per scale, along the input dimension (power of 2, >= 16)
    symmetric: bool = False      # rtn: no zero points (2^(bits-1) implied); minmax and hqq are asymmetric
    algorithm: str = "minmax"    # ALGORITHMS
    accuracy_level: int = 4      # MatMulNBits' compute type for the activations: 0 unset, 1 fp32, 4 int8
    lm_head: bool = True         # quantize the LM head (and so the tied embedding table) too
    lm_head_bits: int | None = 8  # the LM head's own width (symmetric, absmax scales); None: as the other MatMuls
    min_digits: int = 2          # minmax: 4-bit (or 8-bit) digits that carry each column's block minima
    lm_head_shortlist: int = 0   # > 0: a 4-bit draft head, its top rows rescored at lm_head_bits = 8 (docstring)

    def check(self) -> None:
        if self.bits not in (4, 8):
            raise ModelError(f"bits={self.bits}; expected 4 or 8")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ModelError(f"block_size={self.block_size}; expected a power of two >= 16")
        if self.algorithm not in ALGORITHMS:
            raise ModelError(f"algorithm={self.algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
        if self.algorithm in ("hqq", "minmax") and self.symmetric:
            raise ModelError(f"algorithm={self.algorithm!r} fits asymmetric blocks (a float minimum or zero point); "
                             "pass symmetric=False")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ModelError(f"accuracy_level={self.accuracy_level}; expected 0-4")
        if self.lm_head_bits not in (None, 4, 8):
            raise ModelError(f"lm_head_bits={self.lm_head_bits}; expected 4, 8 or None (as the other MatMuls)")
        if self.algorithm == "minmax" and self.lm_head and self.lm_head_bits is None:
            raise ModelError("algorithm='minmax' with lm_head_bits=None: a minmax LM head has no row layout the "
                             "runtime's embedding lookup reads; pass lm_head_bits=4 or 8, or lm_head=False")
        if not 1 <= self.min_digits <= 4:
            raise ModelError(f"min_digits={self.min_digits}; expected 1-4")
        if isinstance(self.lm_head_shortlist, bool) or not isinstance(self.lm_head_shortlist, int) \
                or self.lm_head_shortlist < 0:
            raise ModelError(f"lm_head_shortlist={self.lm_head_shortlist!r}; expected an integer >= 0 (0: no draft "
                             "head)")
        if self.lm_head_shortlist and not (self.lm_head and self.lm_head_bits == 8):
            raise ModelError(f"lm_head_shortlist={self.lm_head_shortlist} rescores an 8-bit LM head; it needs "
                             f"lm_head=True and lm_head_bits=8, not lm_head={self.lm_head}, "
                             f"lm_head_bits={self.lm_head_bits}")

    def record(self) -> dict:
        return {"method": "matmul_nbits", **asdict(self)}


# the --llm-precision presets (measured: module docstring)
PRESETS = {
    "int4": QuantSettings(bits=4, lm_head_shortlist=64),
    "int8": QuantSettings(bits=8, symmetric=True, algorithm="rtn", lm_head_bits=None),
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
    settings.check()
    path = Path(folder) / decoder_file
    model = onnx.load(str(path))                                             # with its external weights
    head = _lm_head_to_matmul(model)
    own_head = head is not None and settings.lm_head and settings.lm_head_bits is not None
    exclude = [head] if head is not None and (own_head or not settings.lm_head) else []
    if settings.algorithm == "minmax":
        quantized = _quantize_minmax(model, settings, exclude)
    else:
        quantized = _quantize_ort(model, settings, exclude)
    if own_head and settings.lm_head_shortlist and not _shortlist_head(quantized, head, settings):
        settings = replace(settings, lm_head_shortlist=0)               # no draft fits: the head stays whole
    if own_head and not settings.lm_head_shortlist:
        _quantize_symmetric(quantized, head, settings.lm_head_bits, settings.block_size, settings.accuracy_level)
    elif head and not settings.lm_head:
        _restore_gemm(quantized, head)
    n = sum(node.op_type == "MatMulNBits" for node in quantized.graph.node)
    log.info("quantized %d MatMuls to MatMulNBits (%d-bit, block %d, %s, %s; LM head %s)", n, settings.bits,
             settings.block_size, "symmetric" if settings.symmetric else "asymmetric", settings.algorithm,
             "float" if not settings.lm_head else f"{settings.lm_head_bits or settings.bits}-bit"
             + (f", 4-bit draft, top {settings.lm_head_shortlist} rescored" if settings.lm_head_shortlist else ""))
    data = path.with_name(external_data(path.name))
    data.unlink()
    _save(quantized, path, data.name)
    return settings.record()


def _quantize_ort(model: onnx.ModelProto, settings: QuantSettings, exclude: list[str]) -> onnx.ModelProto:
    """ONNX Runtime's own quantizer (rtn, hqq) on every MatMul with a constant weight but `exclude`."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

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
    return quantized


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., n] (n even for 4 bits) -> MatMulNBits' bytes, low bits first."""
    codes = codes.astype(np.uint8)
    return codes if bits == 8 else codes[..., 0::2] | (codes[..., 1::2] << 4)


def minmax_tensors(weight: np.ndarray, bits: int, block: int, digits: int) -> tuple[np.ndarray, ...]:
    """A [K, N] weight -> (data uint8 [N, blocks, block * bits / 8], scales float32 [N, blocks], zero points
    uint8 packed [N, ...], sums float32 [K, S]) of the minmax MatMulNBits over the input concat(x, x @ sums)
    (module docstring: K' = blocks * block = K padded to whole blocks + `digits` x P minima rows)."""
    k, n = weight.shape
    levels, mid = 2 ** bits - 1, 2 ** (bits - 1)
    qmax = mid - 1
    kb = -(-k // block)
    rows = -(-kb // block) * block                      # P: one digit's rows (kb minima padded to whole blocks)
    w = np.full((n, kb * block), np.nan)
    w[:, :k] = weight.T
    w = w.reshape(n, kb, block)
    low, high = np.nanmin(w, -1), np.nanmax(w, -1)      # [N, kb]
    scale = ((high - low) / levels).astype(np.float32)
    codes = np.clip(np.rint((w - low[..., None]) / np.where(scale > 0, scale, 1)[..., None]), 0, levels)
    codes[np.isnan(w)] = 0                              # padding rows meet zero activations
    # the integer zero point carries the minimum up to a fraction of a step; the digits carry that rest
    zero = np.clip(np.rint(-low / np.where(scale > 0, scale, 1)), 0, levels)
    parts, scales, zeros = [codes], [scale], [zero]
    rest = low + zero * scale.astype(np.float64)        # (code - zero) * scale + rest = code * scale + low
    step = np.abs(rest).max(-1) / qmax                  # [N]: the first digit spans the column's largest rest
    for _ in range(digits):
        s = step.astype(np.float32)
        digit = np.clip(np.rint(rest / np.where(s > 0, s, 1)[:, None]), -qmax, qmax)
        rest = rest - digit * s[:, None]
        column = np.full((n, rows), float(mid))
        column[:, :kb] = digit + mid
        parts.append(column.reshape(n, rows // block, block))
        scales.append(np.repeat(s[:, None], rows // block, axis=1))
        zeros.append(np.full((n, rows // block), mid))
        step = step / (2 * qmax)                        # the next digit spans this one's rounding error
    zero = np.concatenate(zeros, axis=1).astype(np.uint8)
    if bits == 4 and zero.shape[1] % 2:
        zero = np.pad(zero, ((0, 0), (0, 1)))
    return (_pack(np.concatenate(parts, axis=1), bits), np.concatenate(scales, axis=1).astype(np.float32),
            _pack(zero, bits), block_sums(k, block, digits))


def block_sums(k: int, block: int, digits: int) -> np.ndarray:
    """[K, S] 0/1: x @ sums = zeros up to whole blocks of x, then x's block sums (padded to whole blocks) once per
    digit: the columns minmax_tensors' extra rows meet."""
    kb = -(-k // block)
    rows = -(-kb // block) * block
    sums = np.zeros((k, kb * block - k + digits * rows), np.float32)
    for i in range(digits):
        sums[np.arange(k), kb * block - k + i * rows + np.arange(k) // block] = 1
    return sums


def symmetric_tensors(weight: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """A [K, N] weight -> (data, scales): scale = block absmax / (2^(bits-1) - 1), code = round(w / scale) +
    2^(bits-1) (MatMulNBits' implied zero point). At 8 bits this is llama.cpp's Q8_0: a Q8_0 table is kept exactly."""
    k, n = weight.shape
    kb = -(-k // block)
    qmax, mid = 2 ** (bits - 1) - 1, 2 ** (bits - 1)
    w = np.zeros((n, kb * block))
    w[:, :k] = weight.T
    w = w.reshape(n, kb, block)
    scale = (np.abs(w).max(-1) / qmax).astype(np.float32)
    codes = np.clip(np.rint(w / np.where(scale > 0, scale, 1)[..., None]), -qmax, qmax) + mid
    return _pack(codes, bits), scale


def _matmul_nbits(node_name: str, inputs: list[str], outputs: list[str], k: int, n: int, bits: int, block: int,
                  accuracy_level: int) -> onnx.NodeProto:
    extra = {"accuracy_level": accuracy_level} if accuracy_level else {}
    return onnx.helper.make_node("MatMulNBits", inputs, outputs, name=f"{node_name}_Q{bits}", domain="com.microsoft",
                                 K=k, N=n, bits=bits, block_size=block, **extra)


def _constant_matmuls(model: onnx.ModelProto, exclude: list[str]):
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        yield node, (None if weight is None or len(weight.dims) != 2 or node.name in exclude else weight)


def _use_contrib_domain(model: onnx.ModelProto) -> None:
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))


def _quantize_minmax(model: onnx.ModelProto, settings: QuantSettings, exclude: list[str]) -> onnx.ModelProto:
    """Every MatMul with a constant [K, N] weight but `exclude` -> (once per input x) MatMul(x, sums) and
    Concat(x, sums), then one MatMulNBits over the concatenation (minmax_tensors)."""
    bits, block, digits = settings.bits, settings.block_size, settings.min_digits
    nodes, inputs, replaced, new, widths = [], {}, set(), [], {}
    for node, weight in list(_constant_matmuls(model, exclude)):
        if weight is None:
            nodes.append(node)
            continue
        k, n = (int(v) for v in weight.dims)
        names = [f"{weight.name}_Q{bits}", f"{weight.name}_scales", f"{weight.name}_zero_points"]
        if weight.name not in replaced:                  # a weight two MatMuls share is quantized once
            w = numpy_helper.to_array(weight).astype(np.float64)
            data, scales, zero, _ = minmax_tensors(w, bits, block, digits)
            new += [numpy_helper.from_array(t, name) for t, name in zip((data, scales, zero), names)]
            widths[weight.name] = data.shape[1] * block
        x = node.input[0]
        if (x, k) not in inputs:
            sums_name = f"minmax_sums_k{k}_b{block}_d{digits}"
            if not any(t.name == sums_name for t in new):
                new.append(numpy_helper.from_array(block_sums(k, block, digits), sums_name))
            summed, joined = f"{x}/minmax_sums", f"{x}/minmax_input"
            nodes += [onnx.helper.make_node("MatMul", [x, sums_name], [summed], name=summed),
                      onnx.helper.make_node("Concat", [x, summed], [joined], name=joined, axis=-1)]
            inputs[(x, k)] = joined
        nodes.append(_matmul_nbits(node.name or weight.name, [inputs[(x, k)], *names], list(node.output),
                                   widths[weight.name], n, bits, block, settings.accuracy_level))
        replaced.add(weight.name)
    _replace(model, nodes, replaced, new)
    return model


def _quantize_symmetric(model: onnx.ModelProto, name: str, bits: int, block: int, accuracy_level: int) -> None:
    """The MatMul `name` (the LM head) -> symmetric MatMulNBits (symmetric_tensors)."""
    nodes, replaced, new = [], set(), []
    for node, weight in list(_constant_matmuls(model, [])):
        if node.name != name or weight is None:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weight).astype(np.float64)
        data, scales = symmetric_tensors(w, bits, block)
        names = [f"{weight.name}_Q{bits}", f"{weight.name}_scales"]
        new += [numpy_helper.from_array(t, n) for t, n in zip((data, scales), names)]
        nodes.append(_matmul_nbits(name, [node.input[0], *names], list(node.output), w.shape[0], w.shape[1], bits,
                                   block, accuracy_level))
        replaced.add(weight.name)
    _replace(model, nodes, replaced, new)


def _shortlist_head(model: onnx.ModelProto, name: str, settings: QuantSettings) -> bool:
    """The MatMul `name` (the LM head, x [B, D] @ W [D, V]) -> a 4-bit draft over every row whose top
    lm_head_shortlist logits are recomputed from the 8-bit rows (module docstring). False, the graph untouched,
    when the head adds a bias (the draft would rank without it) or the vocabulary is no larger than the shortlist."""
    node = next(n for n in model.graph.node if n.name == name)
    weight = next(t for t in model.graph.initializer if t.name == node.input[1])
    d, vocab = (int(v) for v in weight.dims)
    k, block = settings.lm_head_shortlist, settings.block_size
    if any(n.op_type == "Add" and node.output[0] in n.input for n in model.graph.node):
        log.warning("the LM head adds a bias: no draft head (lm_head_shortlist=%d ignored), the 8-bit head runs "
                    "whole", k)
        return False
    if vocab <= k:
        log.info("vocabulary of %d <= lm_head_shortlist=%d: no draft head, the 8-bit head runs whole", vocab, k)
        return False
    w = numpy_helper.to_array(weight).astype(np.float64)
    draft, draft_scales = symmetric_tensors(w, 4, DRAFT_BLOCK)
    rows, row_scales = symmetric_tensors(w, 8, block)
    padded = rows.shape[1] * block
    p, x = SHORTLIST, node.input[0]
    tensors = {f"{p}/draft_Q4": draft, f"{p}/draft_scales": draft_scales,   # rows: GatherBlockQuantized's [V, K]
               f"{p}/rows_Q8": rows.reshape(vocab, padded), f"{p}/rows_scales": row_scales,
               f"{p}/k": np.array([k], np.int64), f"{p}/last": np.array([-1], np.int64)}
    if padded != d:
        tensors |= {f"{p}/starts": np.array([0], np.int64), f"{p}/ends": np.array([d], np.int64)}
    gathered = f"{p}/rows" if padded == d else f"{p}/padded_rows"
    new_nodes = [
        _matmul_nbits(f"{p}/draft", [x, f"{p}/draft_Q4", f"{p}/draft_scales"], [f"{p}/draft"], d, vocab, 4,
                      DRAFT_BLOCK, settings.accuracy_level),
        onnx.helper.make_node("TopK", [f"{p}/draft", f"{p}/k"], [f"{p}/top", f"{p}/ids"], name=f"{p}/topk", axis=-1,
                              sorted=0),
        onnx.helper.make_node("GatherBlockQuantized", [f"{p}/rows_Q8", f"{p}/ids", f"{p}/rows_scales"], [gathered],
                              name=f"{p}/gather", domain="com.microsoft", bits=8, block_size=block, gather_axis=0,
                              quantize_axis=1),                                        # [B, k, K]
        *([] if padded == d else [onnx.helper.make_node("Slice", [gathered, f"{p}/starts", f"{p}/ends", f"{p}/last"],
                                                        [f"{p}/rows"], name=f"{p}/unpad")]),
        onnx.helper.make_node("Unsqueeze", [x, f"{p}/last"], [f"{p}/x_column"], name=f"{p}/x_column"),
        onnx.helper.make_node("MatMul", [f"{p}/rows", f"{p}/x_column"], [f"{p}/exact_column"], name=f"{p}/rescore"),
        onnx.helper.make_node("Squeeze", [f"{p}/exact_column", f"{p}/last"], [f"{p}/exact"], name=f"{p}/exact"),
        onnx.helper.make_node("ScatterElements", [f"{p}/draft", f"{p}/ids", f"{p}/exact"], list(node.output),
                              name=f"{p}/scatter", axis=-1)]
    nodes = []
    for n in model.graph.node:
        nodes += new_nodes if n is node else [n]
    _replace(model, nodes, {weight.name}, [numpy_helper.from_array(t, n) for n, t in tensors.items()])
    return True


def _replace(model: onnx.ModelProto, nodes: list, replaced: set, new: list) -> None:
    """The graph's nodes become `nodes`; the `replaced` weights go (unless something else reads them), `new` come."""
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    read = {name for node in nodes for name in node.input}
    keep = [t for t in model.graph.initializer if t.name not in replaced or t.name in read]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + new)
    _use_contrib_domain(model)


def _save(model: onnx.ModelProto, path: Path, location: str) -> None:
    """Small tensors inline (shape inference reads the exporter's constants), weights in `location`; every
    MatMulNBits / GatherBlockQuantized tensor external, however small: the runtime reads a quantized LM head's rows
    from the file."""
    from onnx.external_data_helper import convert_model_to_external_data, set_external_data

    convert_model_to_external_data(model, all_tensors_to_one_file=True, location=location, size_threshold=INLINE_BYTES)
    activations = {"MatMulNBits": 0, "GatherBlockQuantized": 1}            # the input that is not a weight
    blocks = {name for node in model.graph.node if node.op_type in activations
              for i, name in enumerate(node.input) if name and i != activations[node.op_type]}
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
