"""Resolution buckets (export_bundle(buckets=...), runtime/buckets.py): one vision graph per input size,
each its own static N and the same K; images of two sizes go through different graphs, alone and in
one batch, and the runtime's tokens equal the torch reference's."""
from __future__ import annotations

import numpy as np
import pytest

from edgeprune.errors import EdgepruneError, ModelError
from edgeprune.export.validate import seeded_images
from edgeprune.pruners import build_for_model
from edgeprune.reference import generate
from edgeprune.runtime.format import Files, Keys
from edgeprune.runtime.pipeline import Pipeline

BUCKETS = [(168, 224), (280, 280)]   # grids 6 x 8 (N = 48) and 10 x 10 (N = 100)
KEEP = 16
PROMPT = "What is it?"


@pytest.fixture(scope="module")
def adapter():
    from edgeprune.models import load

    return load("tiny-qwen2-vl")


@pytest.fixture(scope="module")
def bundle(adapter, tmp_path_factory):
    from edgeprune.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("buckets") / "dart"
    manifest = export_bundle(adapter, out, method="dart", keep=KEEP, buckets=BUCKETS, source="tiny-qwen2-vl")
    return out, manifest


@pytest.fixture(scope="module")
def images():
    wide = seeded_images((168, 224), 1, seed=5)[0]       # 192 x 264: aspect 0.73 -> bucket 0
    square = seeded_images((276, 260), 1, seed=6)[0]     # 300 x 300: aspect 1 -> bucket 1
    return [wide, square]


def test_manifest_lists_buckets(bundle):
    out, m = bundle
    listed = m[Keys.VISION_BUCKETS]
    assert [b["size"] for b in listed] == [list(s) for s in BUCKETS]
    assert [b["grid"] for b in listed] == [[6, 8], [10, 10]]
    assert [b["num_image_tokens"] for b in listed] == [48, 100]
    assert listed[0]["file"] == Files.VISION and listed[1]["file"] == "vision_280x280.onnx"
    assert all(b["validation"]["passed"] for b in listed)
    assert m[Keys.MODEL_GRID] == [6, 8] and m[Keys.PRUNER_KEEP] == KEEP   # the default bucket, as before
    assert (out / "vision_280x280.onnx").is_file() and "vision_280x280.onnx" in m[Keys.FILES_SHA256]


@pytest.mark.parametrize("rows", [[0], [1], [0, 1], [1, 0]])
def test_two_sizes_match_torch(adapter, bundle, images, rows):
    batch = [images[i] for i in rows]
    pipe = Pipeline(bundle[0], threads=1)
    got = pipe(batch, PROMPT, max_new_tokens=6)
    assert got.buckets == rows                                             # the square image took the 10 x 10 graph
    ref = generate(adapter, build_for_model("dart", KEEP, adapter.pruner_options()), batch, PROMPT,
                   max_new_tokens=6, buckets=BUCKETS)
    np.testing.assert_array_equal(got.positions, ref.image_positions)
    assert got.ids == ref.ids
    prefix = len(ref.prompt_ids[0])
    for r, bucket in enumerate(rows):                                      # text after the image: s + max(H, W)
        assert ref.position_ids[0, r, prefix + KEEP] == prefix + (8, 10)[bucket]


def test_bucket_errors(adapter, tmp_path):
    from edgeprune.export.bundle import export_bundle
    from edgeprune.models import load

    with pytest.raises(EdgepruneError, match="dynamic batch"):
        export_bundle(adapter, tmp_path / "a", method="dart", keep=KEEP, buckets=BUCKETS, batch=2)
    with pytest.raises(EdgepruneError, match="pass keep"):
        export_bundle(adapter, tmp_path / "b", method="dart", buckets=BUCKETS)
    with pytest.raises(ModelError, match="multiple of patch"):
        export_bundle(adapter, tmp_path / "c", method="dart", keep=KEEP, buckets=[(168, 224), (170, 224)])
    with pytest.raises(EdgepruneError, match="keep=64"):
        export_bundle(adapter, tmp_path / "d", method="dart", keep=64, buckets=BUCKETS)   # 64 > N = 48
    with pytest.raises(ModelError, match="resolution buckets"):
        export_bundle(load("tiny-llava"), tmp_path / "e", method="dart", keep=KEEP, buckets=[(336, 336)])
