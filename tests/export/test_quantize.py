"""export/quantize.py's own MatMulNBits tensors, run by ONNX Runtime's kernel: minmax (the int4 preset) keeps a
weight that already lies on a 4-bit min/scale grid (llama.cpp's Q4_1, what edgeprune-mini's SmolLM2 ships as) to
the precision of its minima digits; the symmetric 8-bit LM head keeps a Q8_0 table exactly; settings errors."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeprune.errors import ModelError
from edgeprune.export.quantize import DRAFT_BLOCK, QuantSettings, minmax_tensors, symmetric_tensors


def _run(nodes, inits, x) -> np.ndarray:
    import onnxruntime as ort

    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(a, n) for n, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _minmax(w, x, digits, accuracy_level=0, bits=4, block=32) -> np.ndarray:
    data, scales, zero, sums = minmax_tensors(w.astype(np.float64), bits, block, digits)
    extra = {"accuracy_level": accuracy_level} if accuracy_level else {}
    nodes = [helper.make_node("MatMul", ["x", "sums"], ["s"]), helper.make_node("Concat", ["x", "s"], ["xs"], axis=-1),
             helper.make_node("MatMulNBits", ["xs", "q", "scales", "zp"], ["y"], domain="com.microsoft",
                              K=data.shape[1] * block, N=w.shape[1], bits=bits, block_size=block, **extra)]
    return _run(nodes, {"q": data, "scales": scales, "zp": zero, "sums": sums}, x)


def _q4_1(k, n, rng) -> np.ndarray:
    """[K, N]: blocks of 32 along K at d * q + m, q in 0..15 with both ends used (as llama.cpp's Q4_1 writes)."""
    kb = -(-k // 32)
    d, m = rng.uniform(0.001, 0.01, (kb, n)), -rng.uniform(3, 12, (kb, n))
    q = rng.integers(0, 16, (kb * 32, n))
    q[0::32], q[1::32] = 0, 15
    return (np.repeat(d, 32, 0) * q + np.repeat(m * d, 32, 0))[:k].astype(np.float32)


def _relative(y, ref) -> float:
    return float(np.abs(y - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("k", [576, 1536, 100])   # 18 / 48 blocks; 100: a partial last block
def test_minmax_keeps_a_q4_1_weight(k):
    """Measured max relative output error at accuracy level 0: 1 digit 0.3-0.5%, 2 digits 0.02-0.03%, 3 digits
    0.001-0.003% (the minima's rest after the integer zero point, one 4-bit digit each); a symmetric or
    integer-zero-point 4-bit fit of the same weight: ~8% of the weights' RMS."""
    rng = np.random.default_rng(0)
    w, x = _q4_1(k, 48, rng), rng.normal(0, 1, (2, 3, k)).astype(np.float32)
    ref = x @ w
    errors = [_relative(_minmax(w, x, digits), ref) for digits in (1, 2, 3)]
    assert errors[0] < 1e-2 and errors[1] < 1e-3 and errors[2] < 1e-4, errors
    assert errors[0] > errors[1] > errors[2]                      # each digit carries the minima further
    assert _relative(_minmax(w, x, 2, accuracy_level=4), ref) < 2e-2  # int8 activations in the kernel


def test_minmax_on_an_arbitrary_weight_is_a_4_bit_fit():
    """A weight off any grid: minmax is the Q4_1 fit (scale = range / 15, the minimum kept): ~7-9% output error
    here, not exact, and not garbage."""
    rng = np.random.default_rng(1)
    w, x = rng.normal(0, 0.05, (576, 64)).astype(np.float32), rng.normal(0, 1, (4, 576)).astype(np.float32)
    assert 0.02 < _relative(_minmax(w, x, 2), x @ w) < 0.15


@pytest.mark.parametrize("bits", [8, 4])
def test_symmetric_head_keeps_a_table_on_its_grid(bits):
    """lm_head_bits 8: llama.cpp's Q8_0 table (d * q, |q| <= 127, absmax 127 * d per block) is kept exactly; 4:
    the same on a 4-bit grid (|q| <= 7)."""
    rng = np.random.default_rng(2)
    qmax = 2 ** (bits - 1) - 1
    d = rng.uniform(0.001, 0.01, (4, 96))
    q = rng.integers(-qmax, qmax + 1, (128, 96))
    q[5::32] = qmax                                                  # every block's absmax is qmax * d
    w = (np.repeat(d, 32, 0) * q).astype(np.float32)
    data, scales = symmetric_tensors(w.astype(np.float64), bits, 32)
    x = rng.normal(0, 1, (3, 128)).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "q", "scales"], ["y"], domain="com.microsoft", K=128, N=96, bits=bits,
                            block_size=32)
    assert _relative(_run([node], {"q": data, "scales": scales}, x), x @ w) < 1e-5


@pytest.mark.parametrize("settings, message", [
    (dict(bits=4, symmetric=True), "algorithm='minmax' fits asymmetric blocks"),
    (dict(bits=4, lm_head_bits=None), "algorithm='minmax' with lm_head_bits=None"),
    (dict(bits=4, lm_head_bits=2), "lm_head_bits=2; expected 4, 8 or None"),
    (dict(bits=4, min_digits=0), "min_digits=0; expected 1-4"),
    (dict(bits=3), "bits=3; expected 4 or 8"),
])
def test_settings_errors(settings, message):
    with pytest.raises(ModelError, match=message.replace("(", r"\(")):
        QuantSettings(**settings).check()


def test_minmax_float_head_and_rtn_head_stay_valid():
    QuantSettings(bits=4, lm_head=False, lm_head_bits=None).check()      # the head left float
    QuantSettings(bits=4, algorithm="rtn", symmetric=True, lm_head_bits=None).check()   # the earlier preset


def _head_model(folder, w: np.ndarray, bias: np.ndarray | None = None) -> None:
    """decoder.onnx (+ .data): logits = x [B, D] @ w[V, D]^T (+ bias), the Gemm(transB=1) export_llm writes."""
    import onnx

    v, d = w.shape
    nodes = [helper.make_node("Gemm", ["x", "lm_head.weight"], ["head" if bias is not None else "logits"],
                              name="/Gemm", transB=1)]
    inits = [numpy_helper.from_array(w, "lm_head.weight")]
    if bias is not None:
        nodes.append(helper.make_node("Add", ["head", "lm_head.bias"], ["logits"]))
        inits.append(numpy_helper.from_array(bias, "lm_head.bias"))
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", d])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", v])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(folder / "decoder.onnx"), save_as_external_data=True, location="decoder.onnx.data",
              size_threshold=0)


@pytest.mark.parametrize("d", [96, 100])   # 3 whole blocks; 100: a padded last block (the rows are cut back)
def test_shortlist_head_rescores_the_drafts_top_rows_at_8_bits(tmp_path, d):
    """lm_head_shortlist: the k highest draft (4-bit) logits are the 8-bit head's, in float32; every row's argmax
    is the 8-bit head's, although the 4-bit draft alone picks another token in some rows; the others are the
    draft's. The bias-free head of a random Gaussian weight: measured 11-14 of 64 rows where the draft's argmax
    differs, the 8-bit argmax ranking at most ~4 in the draft."""
    import onnx
    import onnxruntime as ort

    from edgeprune.export.quantize import quantize_decoder

    rng = np.random.default_rng(3)
    v, k = 512, 16
    w = rng.normal(0, 0.05, (v, d)).astype(np.float32)
    x = rng.normal(0, 1, (64, d)).astype(np.float32)
    _head_model(tmp_path, w)
    settings = QuantSettings(bits=4, lm_head_shortlist=k)
    assert quantize_decoder(tmp_path, "decoder.onnx", settings)["lm_head_shortlist"] == k
    ops = [n.op_type for n in onnx.load(str(tmp_path / "decoder.onnx"), load_external_data=False).graph.node]
    assert {"MatMulNBits", "TopK", "GatherBlockQuantized", "ScatterElements"} <= set(ops) and "Gemm" not in ops
    logits = ort.InferenceSession(str(tmp_path / "decoder.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    eight = _dequantized(*symmetric_tensors(w.T.astype(np.float64), 8, 32), 8, d) @ x.T        # [V, B]
    four = _dequantized(*symmetric_tensors(w.T.astype(np.float64), 4, DRAFT_BLOCK), 4, d, DRAFT_BLOCK) @ x.T
    order = np.argsort(-four, axis=0).T                                                    # [B, V]
    surely_kept, surely_not = order[:, :k // 2], order[:, 2 * k:]   # the kernel's int8 activations move the k-th
    np.testing.assert_allclose(np.take_along_axis(logits, surely_kept, 1),
                               np.take_along_axis(eight.T, surely_kept, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(logits.argmax(1), eight.argmax(0))
    assert (four.argmax(0) != eight.argmax(0)).sum() >= 5              # the draft alone would have picked others
    draft = np.take_along_axis(logits, surely_not, 1)
    assert np.abs(draft - np.take_along_axis(four.T, surely_not, 1)).max() < 0.02 * np.abs(four).max()
    assert np.abs(draft - np.take_along_axis(eight.T, surely_not, 1)).max() > 0.02 * np.abs(four).max()


def _dequantized(data, scales, bits, d, block=32) -> np.ndarray:
    from edgeprune.runtime.embedding import dequantize_rows

    return dequantize_rows(data, scales, np.arange(data.shape[0]), None, bits, block, d)   # [V, D]


def test_shortlist_head_is_left_whole_with_a_bias_or_a_small_vocabulary(tmp_path, caplog):
    """A head that adds a bias (the draft would rank without it) or a vocabulary no larger than the shortlist: the
    8-bit head runs whole and the record says lm_head_shortlist 0."""
    import onnx

    from edgeprune.export.quantize import quantize_decoder

    rng = np.random.default_rng(4)
    for name, w, bias in (("bias", rng.normal(0, 0.05, (512, 64)), rng.normal(0, 1, 512)),
                          ("small", rng.normal(0, 0.05, (16, 64)), None)):
        folder = tmp_path / name
        folder.mkdir()
        _head_model(folder, w.astype(np.float32), None if bias is None else bias.astype(np.float32))
        record = quantize_decoder(folder, "decoder.onnx", QuantSettings(bits=4, lm_head_shortlist=16))
        ops = [n.op_type for n in onnx.load(str(folder / "decoder.onnx"), load_external_data=False).graph.node]
        assert record["lm_head_shortlist"] == 0 and ops.count("MatMulNBits") == 1 and "TopK" not in ops, name
    assert "adds a bias" in caplog.text


@pytest.mark.parametrize("settings, message", [
    (dict(bits=4, lm_head_shortlist=-1), "lm_head_shortlist=-1; expected an integer >= 0"),
    (dict(bits=4, lm_head_shortlist=True), "lm_head_shortlist=True; expected an integer >= 0"),
    (dict(bits=4, lm_head_bits=4, lm_head_shortlist=8), "lm_head_shortlist=8 rescores an 8-bit LM head"),
    (dict(bits=4, lm_head=False, lm_head_shortlist=8), "it needs lm_head=True and lm_head_bits=8"),
])
def test_shortlist_settings_errors(settings, message):
    with pytest.raises(ModelError, match=message):
        QuantSettings(**settings).check()
