"""Qwen3-VL, InternVL and SmolVLM export -> torch-free runtime on their tiny presets: the vision graph passes the
lint and ORT parity (DeepStack features included), and runtime greedy tokens equal the torch reference at K < N
for a selection method (dart) and a merging method (visionzip), batch 2 (and 1); bad input is refused clearly."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgeprune.errors import BundleError, EdgepruneError, ModelError
from edgeprune.export.validate import seeded_images
from edgeprune.reference import generate
from edgeprune.runtime.format import DECODER_DEEPSTACK, PASSED, VISION_DEEPSTACK, Files, Graph, Keys
from edgeprune.runtime.pipeline import Pipeline

METHODS = ("dart", "visionzip")
PROMPT = "Describe the image."
# preset -> (family, N, K, M-RoPE, DeepStack layers)
FAMILIES = {"tiny-qwen3-vl": ("qwen3_vl", 48, 16, True, 2),
            "tiny-internvl": ("internvl", 80, 30, False, 0),
            "tiny-smolvlm": ("smolvlm", 94, 40, False, 0)}


@pytest.fixture(scope="module", params=list(FAMILIES))
def preset(request):
    return request.param


@pytest.fixture(scope="module")
def adapter(preset):
    from edgeprune.models import load

    return load(preset)


@pytest.fixture(scope="module")
def bundles(adapter, preset, tmp_path_factory):
    """One bundle per method (dynamic batch); the LLM graphs are exported once and reused."""
    from edgeprune.export.bundle import export_bundle

    root = tmp_path_factory.mktemp(adapter.family)
    out, first = {}, None
    for method in METHODS:
        path = root / method
        manifest = export_bundle(adapter, path, method=method, keep=FAMILIES[preset][2], source=preset,
                                 reuse_llm_from=first)
        first = first or path
        out[method] = (path, manifest)
    return out


def test_manifest(bundles, preset):
    family, n, keep, mrope, deep = FAMILIES[preset]
    for _, m in bundles.values():
        assert m[Keys.MODEL_FAMILY] == family and m[Keys.MODEL_NUM_IMAGE_TOKENS] == n and m[Keys.PRUNER_KEEP] == keep
        assert m[Keys.POSITIONS_ROPE] == ("mrope" if mrope else "1d")
        assert m[Keys.VALIDATION_VISION][PASSED] and m[Keys.VALIDATION_LLM][PASSED]
        outputs, inputs = m[Keys.VISION_GRAPH][Graph.OUTPUTS], m[Keys.LLM_DECODER_GRAPH][Graph.INPUTS]
        assert m[Keys.LLM_DEEPSTACK_LAYERS] == deep
        if deep:   # the vision graph's DeepStack output feeds the decoder's extra input
            assert outputs[VISION_DEEPSTACK][Graph.SHAPE] == ["batch", keep, deep, 64]
            assert inputs[DECODER_DEEPSTACK][Graph.SHAPE] == ["batch", "sequence", deep, 64]
        else:
            assert VISION_DEEPSTACK not in outputs and DECODER_DEEPSTACK not in inputs


@pytest.mark.parametrize("batch", [2, 1])
@pytest.mark.parametrize("method", METHODS)
def test_runtime_equals_reference(adapter, bundles, preset, method, batch):
    if batch == 1 and method != "dart":
        pytest.skip("batch 1 once per family")
    keep = FAMILIES[preset][2]
    images = seeded_images(adapter.preprocess_config.size, batch, seed=11)
    got = Pipeline(bundles[method][0], threads=1)(images, PROMPT, max_new_tokens=8)
    ref = generate(adapter, adapter.build_pruner(method, keep), images, PROMPT, max_new_tokens=8)
    np.testing.assert_array_equal(got.positions, ref.image_positions)
    assert got.ids == ref.ids and got.num_prompt_tokens == ref.position_ids.shape[-1]


def test_bad_input(adapter, bundles, preset, tmp_path):
    from edgeprune.export.bundle import export_bundle

    family, n, keep, mrope, deep = FAMILIES[preset]
    if mrope:   # kept tokens must keep their grid ids
        with pytest.raises(EdgepruneError, match="M-RoPE"):
            export_bundle(adapter, tmp_path / "x", method="dart", keep=keep, positions="compact")
    else:       # fewer image tokens than views
        fixed = len(adapter.fixed_positions)
        with pytest.raises(ModelError, match=rf"keep={fixed + 2} .* expected keep >= {fixed + 5}"):
            export_bundle(adapter, tmp_path / "x", method="dart", keep=fixed + 2)
    with pytest.raises(EdgepruneError, match=rf"keep={n + 1}, expected 1 <= keep <= N={n}"):
        export_bundle(adapter, tmp_path / "x", method="dart", keep=n + 1)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ModelError, match="expected uint8"):
        Pipeline(bundles["dart"][0], threads=1)(np.zeros((8, 8, 3), np.float32), PROMPT, max_new_tokens=1)


def test_deepstack_manifest_must_match_the_graph(bundles, preset, tmp_path):
    """A manifest that disagrees with the vision graph about DeepStack is refused at load, naming the outputs."""
    import shutil

    if not FAMILIES[preset][4]:
        pytest.skip("DeepStack models only")
    path = tmp_path / "bundle"
    shutil.copytree(bundles["dart"][0], path)
    manifest = json.loads((path / Files.MANIFEST).read_text())
    manifest[Keys.LLM_DEEPSTACK_LAYERS] = 0
    (path / Files.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"outputs \['deepstack_tokens', 'image_tokens', 'positions'\], the manifest "
                                          r"expects \['image_tokens', 'positions'\]"):
        Pipeline(path, threads=1)
