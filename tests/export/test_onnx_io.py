"""export/onnx_io.py: the module traced without weights, constants folded here and the weights streamed to the
file: outputs equal torch, every weight is stored once per layout the graph reads (tied weights too), all-constant subgraphs are folded
away, large initializers live in the external data file and small ones inline."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from edgeprune.export.onnx_io import INLINE_BYTES, export_onnx


class Tied(nn.Module):
    """Embedding tied to the output head (applied to the last position, as the decoder's lm_head), a Linear (its
    transpose is folded), a buffer and an arange mask."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 20)
        self.proj = nn.Linear(20, 20)
        self.head = nn.Linear(20, 50, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.full((20,), 0.5))

    def forward(self, ids):                                             # [B, L]
        x = self.proj(self.embed(ids)) * self.scale                     # [B, L, 20]
        n = x.shape[1]
        causal = (torch.arange(8)[:, None] >= torch.arange(8)[None, :]).float()   # constant: folded to one tensor
        x = x + causal[:n, :n].sum(-1, keepdim=True)
        return self.head(x[:, -1])                                      # [B, 50]


def test_streamed_export_equals_torch_and_stores_each_weight_once_per_layout(tmp_path):
    torch.manual_seed(0)
    module = Tied().eval()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    path = export_onnx(module, (ids,), tmp_path / "m.onnx", input_names=["ids"], output_names=["logits"],
                       dynamic_axes={"ids": {0: "b", 1: "l"}, "logits": {0: "b", 1: "l"}}, external_data=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = torch.tensor([[9, 8, 7], [1, 1, 1], [0, 49, 3]])             # another batch and length than traced
    for x in (ids, other):
        with torch.no_grad():
            expected = module(x).numpy()
        np.testing.assert_allclose(session.run(None, {"ids": x.numpy()})[0], expected, rtol=1e-5, atol=1e-5)

    model = onnx.load(str(path), load_external_data=False)
    assert [i.name for i in model.graph.input] == ["ids"]
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inline = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    sizes = {t.name: int(dict((e.key, e.value) for e in t.external_data)["length"]) for t in external}
    # proj's folded 20 x 20 transpose; the tied 50 x 20 table once as Gather reads it and once transposed for the
    # head's MatMul (one copy per layout the graph needs); nothing else big
    assert sorted(sizes.values()) == [20 * 20 * 4, 50 * 20 * 4, 50 * 20 * 4]
    assert (tmp_path / "m.onnx.data").stat().st_size == sum(sizes.values())
    assert all(onnx.numpy_helper.to_array(t).nbytes <= INLINE_BYTES for t in inline)
    ops = [n.op_type for n in model.graph.node]
    assert "Range" not in ops and "Transpose" not in ops               # the mask and the transpose were folded


def test_without_external_data_everything_is_inline(tmp_path):
    module = Tied().eval()
    path = export_onnx(module, (torch.tensor([[1, 2]]),), tmp_path / "m.onnx", input_names=["ids"],
                       output_names=["logits"])
    assert not (tmp_path / "m.onnx.data").exists()
    model = onnx.load(str(path))
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def test_a_graph_with_external_data_passes_the_lint_from_any_folder(tmp_path, monkeypatch):
    """The TensorRT lint (check_graph) reads small constants only: a graph whose weights live in external data is
    linted without opening the data file (it failed so for Qwen2-VL-2B's 2.7 GB vision graph, run elsewhere)."""
    from edgeprune.export.validate import check_graph

    path = export_onnx(Tied().eval(), (torch.tensor([[1, 2]]),), tmp_path / "m.onnx", input_names=["ids"],
                       output_names=["logits"], external_data=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    check_graph(path)
