"""edgeprune-mini end to end (slow): the README's step-by-step example — `edgeprune export --method
divprune --keep 64`, then `edgeprune run` on the shipped Fashion-MNIST test image with the question
the model was aligned for — answers the expected class and states the model's domain once on
stderr; every shipped example answers its label; and the runtime's greedy tokens equal the torch
reference on a real photo (scikit-image's 'chelsea')."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeprune.cli import main
from edgeprune.eval.data import PROMPT
from edgeprune.runtime.format import PASSED, Files, Keys

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "fashion-mnist"
METHOD = "divprune"   # the README's


@pytest.fixture(scope="module")
def chelsea(tmp_path_factory):
    from PIL import Image
    from skimage import data

    path = tmp_path_factory.mktemp("photo") / "chelsea.png"
    Image.fromarray(data.chelsea()).save(path)
    return path


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("mini") / "mini-k64"
    assert main(["export", "--method", METHOD, "--keep", "64", "--out", str(out), "-q"]) == 0  # default model
    return out


def test_export_manifest(bundle):
    m = json.loads((bundle / Files.MANIFEST).read_text())
    assert m[Keys.MODEL_FAMILY] == "edgeprune-mini" and m[Keys.PRUNER_KEEP] == 64
    assert m[Keys.MODEL_NUM_IMAGE_TOKENS] == 576 and m[Keys.POSITIONS_MODE] == "original"
    assert m[Keys.VALIDATION_VISION][PASSED]
    assert "Fashion-MNIST" in m[Keys.MODEL_DOMAIN] and "Sneaker" in m[Keys.MODEL_DOMAIN]


def test_readme_example_answers_sneaker(bundle, capsys):
    assert main(["run", str(bundle), "--image", str(EXAMPLES / "sneaker.png"), "--prompt", PROMPT,
                 "--max-new-tokens", "24"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "Sneaker\n"
    assert captured.err.count("note: this model was trained to recognise the ten Fashion-MNIST garments") == 1
    assert "timing: preprocess" in captured.err and "K=64 of N=576" in captured.err


def test_every_shipped_example_answers_its_label(bundle):
    from edgeprune.eval.data import match_class
    from edgeprune.runtime.pipeline import Pipeline

    record = json.loads((EXAMPLES / "labels.json").read_text())
    assert record["prompt"] == PROMPT and "picked to be answered right" in record["how_picked"]
    images = record["images"]
    result = Pipeline(bundle)([str(EXAMPLES / i["file"]) for i in images], PROMPT, max_new_tokens=8)
    assert [match_class(t) for t in result.texts] == [i["label"] for i in images], result.texts


def test_runtime_matches_reference_on_chelsea(bundle, chelsea):
    from edgeprune.models import load
    from edgeprune.pruners import build_for_model
    from edgeprune.reference import generate
    from edgeprune.runtime.pipeline import Pipeline

    adapter = load("edgeprune-mini")
    pruner = build_for_model(METHOD, 64, adapter.pruner_options())
    prompt = "Describe the image."
    ref = generate(adapter, pruner, str(chelsea), prompt, max_new_tokens=16, positions="original")
    got = Pipeline(bundle)(str(chelsea), prompt, max_new_tokens=16)
    assert got.positions.tolist() == ref.image_positions.tolist()
    assert got.ids == ref.ids and got.texts == ref.text
