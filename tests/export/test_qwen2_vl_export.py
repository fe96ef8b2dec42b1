"""Qwen2-VL and Qwen2.5-VL export -> runtime: the vision graph (walked encoder + pruner + merger) passes the lint and
ORT parity, the decoder takes M-RoPE ids [3, B, L], the manifest records positions.rope, and runtime
tokens equal the torch reference for dart, divprune and visionzip at K < N, batch 1 and 2."""
from __future__ import annotations

import numpy as np
import pytest

from edgeprune.export.validate import seeded_images
from edgeprune.pruners import build_for_model
from edgeprune.reference import generate
from edgeprune.runtime.format import PASSED, Graph, Keys
from edgeprune.runtime.pipeline import Pipeline

KEEP = 16
METHODS = ("dart", "divprune", "visionzip")
PROMPT = "Describe the image."


@pytest.fixture(scope="module", params=["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def adapter(request):
    from edgeprune.models import load

    return load(request.param)


@pytest.fixture(scope="module")
def bundles(adapter, tmp_path_factory):
    """One bundle per method (dynamic batch); the LLM graphs are exported once and reused."""
    from edgeprune.export.bundle import export_bundle

    root = tmp_path_factory.mktemp(adapter.family)
    out, first = {}, None
    for method in METHODS:
        path = root / method
        manifest = export_bundle(adapter, path, method=method, keep=KEEP, source=adapter.name,
                                 reuse_llm_from=first)
        first = first or path
        out[method] = (path, manifest)
    return out


def test_manifest_and_graph_io(bundles):
    path, m = bundles["dart"]
    assert m[Keys.POSITIONS_ROPE] == "mrope" and m[Keys.POSITIONS_MODE] == "original"
    assert m[Keys.MODEL_GRID] == [6, 8] and m[Keys.MODEL_NUM_IMAGE_TOKENS] == 48
    assert m[Keys.LLM_DECODER_GRAPH][Graph.INPUTS]["position_ids"][Graph.SHAPE] == [3, "batch", "sequence"]
    assert m[Keys.POSITIONS_ROPE] == "mrope"
    assert m[Keys.VISION_GRAPH]["outputs"]["positions"]["shape"] == ["batch", KEEP]
    for _, manifest in bundles.values():   # lint ran at export; parity recorded
        assert manifest[Keys.VALIDATION_VISION][PASSED] and manifest[Keys.VALIDATION_LLM][PASSED]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("method", METHODS)
def test_runtime_equals_reference(adapter, bundles, method, batch):
    images = seeded_images((168, 224), batch, seed=11)
    pipe = Pipeline(bundles[method][0], threads=1)
    got = pipe(images, PROMPT, max_new_tokens=8)
    ref = generate(adapter, build_for_model(method, KEEP, adapter.pruner_options()), images, PROMPT,
                   max_new_tokens=8)
    np.testing.assert_array_equal(got.positions, ref.image_positions)
    assert got.ids == ref.ids
    assert ref.position_ids.shape == (3, batch, got.num_prompt_tokens)


def test_rows_with_different_prompts_equal_single_requests(bundles):
    """The server's batched entry point with M-RoPE ids: right-padded rows of different prompt lengths decode
    from each row's own largest id; every row's greedy tokens equal the single request's."""
    images = seeded_images((168, 224), 2, seed=5)
    pipe = Pipeline(bundles["divprune"][0], threads=1)
    prompts = [PROMPT, "What colour is the large object in the middle of this picture, and where is it?"]
    got = pipe.generate_rows(list(images), prompts, max_new_tokens=8)
    assert got.prompt_lengths[0] < got.prompt_lengths[1]
    for i, prompt in enumerate(prompts):
        assert got.ids[i] == pipe(images[i], prompt, max_new_tokens=8).ids[0], f"row {i}"


def test_int4_llm_with_mrope(tmp_path):
    """M-RoPE through the quantized decoder: validation passes (teacher-forced agreement with torch float32 above
    the garbage bound) and the runtime's image positions are the torch reference's."""
    from edgeprune.export.bundle import export_bundle
    from edgeprune.models import load

    adapter = load("tiny-qwen2-vl")
    m = export_bundle(adapter, tmp_path / "int4", method="dart", keep=KEEP, llm_precision="int4",
                      source=adapter.name)
    assert m[Keys.LLM_PRECISION] == "int4" and m[Keys.VALIDATION_LLM][PASSED]
    images = seeded_images((168, 224), 2, seed=11)
    got = Pipeline(tmp_path / "int4", threads=1)(images, PROMPT, max_new_tokens=8)
    ref = generate(adapter, build_for_model("dart", KEEP, adapter.pruner_options()), images, PROMPT, max_new_tokens=8)
    np.testing.assert_array_equal(got.positions, ref.image_positions)
    assert len(got.ids) == 2 and all(got.ids)                       # an answer per image
