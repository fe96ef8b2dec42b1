"""edgeprune-mini end to end (slow): `edgeprune export` at K=64, `edgeprune run` on a real photo
(scikit-image's 'chelsea'), text comes out, and the runtime's greedy tokens equal the torch reference."""
from __future__ import annotations

import json

import pytest

from edgeprune.cli import main
from edgeprune.runtime.format import PASSED, Files, Keys

pytestmark = pytest.mark.slow

METHOD = "dart"
PROMPT = "Describe the image."


@pytest.fixture(scope="module")
def chelsea(tmp_path_factory):
    from PIL import Image
    from skimage import data

    path = tmp_path_factory.mktemp("photo") / "chelsea.png"
    Image.fromarray(data.chelsea()).save(path)
    return path


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("mini") / "bundle"
    assert main(["export", "--method", METHOD, "--keep", "64", "--out", str(out), "-q"]) == 0  # default model
    return out


def test_export_manifest(bundle):
    m = json.loads((bundle / Files.MANIFEST).read_text())
    assert m[Keys.MODEL_FAMILY] == "edgeprune-mini" and m[Keys.PRUNER_KEEP] == 64
    assert m[Keys.MODEL_NUM_IMAGE_TOKENS] == 576 and m[Keys.POSITIONS_MODE] == "original"
    assert m[Keys.VALIDATION_VISION][PASSED]


def test_run_on_chelsea_prints_text(bundle, chelsea, capsys):
    assert main(["run", str(bundle), "--image", str(chelsea), "--prompt", PROMPT, "--max-new-tokens", "24"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip(), "no text came out"
    assert "timing: preprocess" in captured.err and "K=64 of N=576" in captured.err


def test_runtime_matches_reference_on_chelsea(bundle, chelsea):
    from edgeprune.models import load
    from edgeprune.pruners import build_for_model
    from edgeprune.reference import generate
    from edgeprune.runtime.pipeline import Pipeline

    adapter = load("edgeprune-mini")
    pruner = build_for_model(METHOD, 64, adapter.pruner_options())
    ref = generate(adapter, pruner, str(chelsea), PROMPT, max_new_tokens=16, positions="original")
    got = Pipeline(bundle)(str(chelsea), PROMPT, max_new_tokens=16)
    assert got.positions.tolist() == ref.image_positions.tolist()
    assert got.ids == ref.ids and got.texts == ref.text
