"""The vision graph (export/vision.py): encoder + pruner (+ projector) as one ONNX graph, static K.

On the tiny preset: the graph's positions equal the torch pruner's on seeded images, the graph is
clean for onnx.checker (full) and the TensorRT lint, extras and feats-space pruners are handled
generically, and polygraphy runs it.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgeprune.export.validate import check_graph, seeded_images, validate_vision
from edgeprune.export.onnx_io import graph_io
from edgeprune.export.vision import export_vision
from edgeprune.models.vision_step import signals_needed
from edgeprune.pruners import Pruner, Selection, available, build_for_model
from edgeprune.pruners.ops import gather_rows, sort_by_position, topk_indices
from tests.conftest import baseline_options

# the METHODS.md pruners this suite targets; those not registered yet fall back to the baselines
TARGETS = ("dart", "divprune", "visionzip", "autoselect")
METHODS = [m for m in TARGETS if m in available()] or ["attention", "uniform"]
KEEP = 16


@pytest.fixture(scope="module")
def adapter():
    from edgeprune.models import load

    return load("tiny-llava")


@pytest.fixture(scope="module")
def graphs(adapter, tmp_path_factory):
    """method -> (pruner, vision.onnx) exported once per module."""
    folder = tmp_path_factory.mktemp("vision")
    out = {}
    for method in METHODS:
        pruner = build_for_model(method, KEEP, adapter.pruner_options(), **baseline_options(method))
        out[method] = (pruner, export_vision(adapter, pruner, folder / f"{method}.onnx"))
    return out


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


class _ProbePruner(Pruner):
    """Not registered: top-K of feats' first channel, in feats space, with two extra outputs."""

    name = "probe"
    requires = ("feats", "attn")
    space = "feats"
    extra_outputs = ("score_sum", "first_attn")

    def select(self, feats, attn):                                   # [B, N, C], [B, N]
        chosen = topk_indices(feats[..., 0], self.keep)              # [B, K]
        positions, kept = sort_by_position(chosen, gather_rows(feats, chosen))
        return Selection(tokens=kept, positions=positions,
                         extras={"score_sum": attn.sum(dim=1), "first_attn": attn[:, :1]})


@pytest.mark.parametrize("method", METHODS)
def test_positions_equal_torch_pruner_on_seeded_images(method, adapter, graphs):
    pruner, path = graphs[method]
    session = _session(path)
    need = signals_needed(pruner)
    for seed in (1, 2, 3):
        pixels = adapter.preprocess(seeded_images(adapter.preprocess_config.size, 2, seed=seed))
        with torch.no_grad():
            sel = pruner(**adapter.encode(pixels, need).as_kwargs())
            expected = sel.tokens if pruner.space == "tokens" else adapter.project(sel.tokens)
        tokens, positions = session.run(["image_tokens", "positions"], {"pixels": pixels.numpy()})
        assert positions.dtype == np.int64
        np.testing.assert_array_equal(positions, sel.positions.numpy(), err_msg=f"{method}, seed {seed}")
        np.testing.assert_allclose(tokens, expected.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_graph_is_static_k_and_clean(method, adapter, graphs):
    _, path = graphs[method]
    check_graph(path)  # onnx.checker full_check + TensorRT lint: raises on any problem
    io = graph_io(path)
    assert io["inputs"] == {"pixels": {"shape": ["batch", 3, 336, 336], "dtype": "float32"}}
    assert io["outputs"]["image_tokens"]["shape"] == ["batch", KEEP, 64]
    assert io["outputs"]["positions"] == {"shape": ["batch", KEEP], "dtype": "int64"}
    assert onnx.load(str(path)).opset_import[0].version == 17


def test_validate_vision_reports_parity(adapter, graphs):
    pruner, path = graphs[METHODS[0]]
    report = validate_vision(adapter, pruner, path, count=2, seed=7)
    assert report["passed"] and report["positions_equal"] and report["positions_mismatch_rows"] == []
    assert 0 <= report["max_abs_diff"] < report["tolerance"]


def test_keep_n_is_identity(adapter, tmp_path):
    n = adapter.num_image_tokens
    pruner = build_for_model("attention", n, adapter.pruner_options())
    path = export_vision(adapter, pruner, tmp_path / "full.onnx", batch=1)
    pixels = adapter.preprocess(seeded_images(adapter.preprocess_config.size, 1, seed=0))
    tokens, positions = _session(path).run(None, {"pixels": pixels.numpy()})
    np.testing.assert_array_equal(positions, np.arange(n)[None])
    with torch.no_grad():
        expected = adapter.encode(pixels, ("tokens",)).tokens.numpy()
    np.testing.assert_allclose(tokens, expected, atol=1e-4, rtol=0)
    assert graph_io(path)["inputs"]["pixels"]["shape"] == [1, 3, 336, 336]  # --batch 1: fixed


def test_feats_space_pruner_is_projected_and_extras_are_outputs(adapter, tmp_path):
    pruner = _ProbePruner(keep=8).eval()
    assert signals_needed(pruner) == ("feats", "attn")
    path = export_vision(adapter, pruner, tmp_path / "probe.onnx")
    check_graph(path)
    session = _session(path)
    assert [o.name for o in session.get_outputs()] == ["image_tokens", "positions", "score_sum", "first_attn"]
    pixels = adapter.preprocess(seeded_images(adapter.preprocess_config.size, 2, seed=4))
    tokens, positions, score_sum, first = session.run(None, {"pixels": pixels.numpy()})
    with torch.no_grad():
        sig = adapter.encode(pixels, ("feats", "attn"))
        sel = pruner(**sig.as_kwargs())
        projected = adapter.project(sel.tokens)
    assert tokens.shape == (2, 8, 64)                      # D_llm, not the encoder width
    np.testing.assert_array_equal(positions, sel.positions.numpy())
    np.testing.assert_allclose(tokens, projected.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(score_sum, sig.attn.sum(1).numpy(), atol=1e-5)
    assert first.shape == (2, 1)
    report = validate_vision(adapter, pruner, path)
    assert report["passed"] and set(report["extras_max_abs_diff"]) == {"score_sum", "first_attn"}


def test_polygraphy_runs_the_graph(graphs):
    polygraphy = Path(sys.executable).with_name("polygraphy")
    if not polygraphy.exists():
        polygraphy = shutil.which("polygraphy")
    if polygraphy is None:
        pytest.skip("polygraphy is not installed")
    _, path = graphs[METHODS[0]]
    proc = subprocess.run([str(polygraphy), "run", str(path), "--onnxrt", "--input-shapes", "pixels:[1,3,336,336]"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "PASSED" in proc.stdout + proc.stderr


def test_float16_adapter_exports_a_float32_vision_graph(tmp_path):
    """A model loaded in float16 (how `export --fp16` keeps a large model within memory) gets a float32 vision graph
    that matches torch, and its vision weights are float16 again afterwards; no copy of the LLM is made."""
    from edgeprune.export.bundle import export_bundle
    from edgeprune.models import load
    from edgeprune.runtime.format import PASSED, Keys

    adapter = load("tiny-smolvlm", dtype=torch.float16)
    llm_weight = adapter.llm.get_input_embeddings().weight
    m = export_bundle(adapter, tmp_path / "b", method="dart", keep=30, llm_precision="fp16")
    assert m[Keys.VALIDATION_VISION][PASSED] and m[Keys.VALIDATION_LLM][PASSED]
    assert m[Keys.VISION_GRAPH]["inputs"]["pixels"]["dtype"] == "float32"
    assert m[Keys.VISION_GRAPH]["outputs"]["image_tokens"]["dtype"] == "float32"
    assert {p.dtype for p in adapter.parameters()} == {torch.float16}
    assert adapter.llm.get_input_embeddings().weight is llm_weight
