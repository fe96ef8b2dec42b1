"""LLaVA-NeXT anyres export -> runtime: the vision graph (views + per-view pruning + newlines, one static
K) passes the lint and ORT parity, and runtime tokens equal the torch reference at K < N, batch 1 and 2,
in each method's position mode."""
from __future__ import annotations

import numpy as np
import pytest

from edgeprune.export.validate import seeded_images
from edgeprune.reference import generate
from edgeprune.runtime.format import PASSED, Keys
from edgeprune.runtime.pipeline import Pipeline

KEEP = 100
METHODS = ("dart", "divprune", "visionzip")   # dart: original positions; the others: compact


@pytest.fixture(scope="module")
def adapter():
    from edgeprune.models import load

    return load("tiny-llava-next")


@pytest.fixture(scope="module")
def bundles(adapter, tmp_path_factory):
    from edgeprune.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("llava_next")
    out, first = {}, None
    for method in METHODS:
        path = root / method
        manifest = export_bundle(adapter, path, method=method, keep=KEEP, source="tiny-llava-next",
                                 reuse_llm_from=first)
        first = first or path
        out[method] = (path, manifest)
    return out


def test_manifest(bundles):
    for method, (_, m) in bundles.items():
        assert m[Keys.MODEL_FAMILY] == "llava_next" and m[Keys.MODEL_NUM_IMAGE_TOKENS] == 336
        assert m[Keys.PRUNER_KEEP] == KEEP and m[Keys.POSITIONS_ROPE] == "1d"
        assert m[Keys.VALIDATION_VISION][PASSED]
    assert bundles["dart"][1][Keys.POSITIONS_MODE] == "original"
    assert bundles["divprune"][1][Keys.POSITIONS_MODE] == "compact"


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("method", METHODS)
def test_runtime_equals_reference(adapter, bundles, method, batch):
    images = seeded_images((224, 224), batch, seed=13)
    got = Pipeline(bundles[method][0], threads=1)(images, "Describe it.", max_new_tokens=8)
    ref = generate(adapter, adapter.build_pruner(method, KEEP), images, "Describe it.", max_new_tokens=8)
    np.testing.assert_array_equal(got.positions, ref.image_positions)
    assert got.ids == ref.ids
