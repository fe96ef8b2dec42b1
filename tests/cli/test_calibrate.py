"""`edgeprune calibrate` -> a prior that d2pruner bakes into an exported bundle."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from edgeprune.cli import main
from edgeprune.models import load


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        path = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_calibrate_writes_the_mean_attention(images, tmp_path, capsys):
    out = tmp_path / "bias.npy"
    assert main(["calibrate", "--model", "tiny-llava", "--images", *map(str, images), "--batch-size", "2",
                 "--out", str(out)]) == 0
    prior = np.load(out)
    adapter = load("tiny-llava")
    with torch.no_grad():
        expected = adapter.encode(adapter.preprocess([str(p) for p in images]), need=("attn",)).attn.mean(0)
    np.testing.assert_allclose(prior, expected.numpy(), rtol=1e-5, atol=1e-7)
    assert main(["calibrate", "--model", "tiny-llava", "--images", str(images[0]), "--out", str(out)]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    # the prior goes into a d2pruner bundle and is stored there
    bundle = tmp_path / "bundle"
    assert main(["export", "--model", "tiny-llava", "--method", "d2pruner", "--keep", "16", "--cfg",
                 f"bias={out}", "--no-validate", "--out", str(bundle)]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    stored = manifest["pruner.config"]["bias"]            # the values travel with the bundle, not a path
    assert isinstance(stored, dict) and np.array_equal(np.load(bundle / stored["file"]), prior)
