"""What the runtime loads is listed, hashed, inside the bundle and verified; `inspect` refuses what `run`
refuses, in one line (issue 14, items 5, 7, 9). Each test first reproduces the failure the issue reported."""
from __future__ import annotations

import json
import logging
import os
import re

import numpy as np
import pytest

from edgeprune.cli import main
from edgeprune.errors import BundleError
from edgeprune.runtime.bundle import load_bundle
from edgeprune.runtime.format import Files, Graph, Keys, external_data
from edgeprune.runtime.pipeline import Pipeline
from tests.reliability.conftest import edit_manifest


def _unlist(bundle, rel: str) -> None:
    manifest = json.loads((bundle / Files.MANIFEST).read_text())
    del manifest[Keys.FILES_SHA256][rel]
    (bundle / Files.MANIFEST).write_text(json.dumps(manifest))


# -- 5. unverified files --------------------------------------------------------------------------------------
@pytest.mark.parametrize("rel", [Files.EMBED_TABLE, Files.DECODER, external_data(Files.DECODER), Files.TOKENIZER])
def test_a_file_the_runtime_opens_must_be_listed(bundle_copy, rel, capsys):
    _unlist(bundle_copy, rel)
    with pytest.raises(BundleError, match=f"{rel}: the runtime loads it but files.sha256 does not list it"):
        load_bundle(bundle_copy)
    assert main(["inspect", str(bundle_copy)]) == 1
    out, err = capsys.readouterr()
    assert "files: ERROR" in out and "does not list it" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("path", ["../elsewhere/decoder.onnx", "/tmp/decoder.onnx", "./decoder.onnx",
                                  "a/../decoder.onnx", "decoder\x00.onnx"])
def test_a_graph_path_outside_the_bundle_is_refused(bundle_copy, path):
    graph = json.loads((bundle_copy / Files.MANIFEST).read_text())[Keys.LLM_DECODER_GRAPH]
    edit_manifest(bundle_copy, **{Keys.LLM_DECODER_GRAPH: {**graph, Graph.FILE: path}})
    with pytest.raises(BundleError, match="is not a relative path inside the bundle"):
        load_bundle(bundle_copy, verify=False)


def test_a_symlink_leading_out_of_the_bundle_is_refused(bundle_copy, tmp_path):
    outside = tmp_path / "tokenizer.json"
    os.replace(bundle_copy / Files.TOKENIZER, outside)
    os.symlink(outside, bundle_copy / Files.TOKENIZER)          # same bytes, so the hash alone would pass
    with pytest.raises(BundleError, match="tokenizer.json: leads outside the bundle"):
        load_bundle(bundle_copy)


def test_unlisted_files_are_reported_and_never_block(bundle_copy, caplog, capsys):
    (bundle_copy / "notes.txt").write_text("mine")
    (bundle_copy / Files.ENGINES).mkdir()
    (bundle_copy / Files.ENGINES / "old.plan").write_bytes(b"x")
    assert load_bundle(bundle_copy).unlisted == ("engines/old.plan", "notes.txt")
    with caplog.at_level(logging.WARNING):
        Pipeline(bundle_copy, threads=1)
    assert "holds 2 file(s) its manifest does not list (never loaded): engines/old.plan, notes.txt" in caplog.text
    assert main(["inspect", str(bundle_copy)]) == 0
    assert "unlisted: notes.txt (not in the manifest; the runtime never opens it)" in capsys.readouterr().out


# -- 7. inspect checks what run checks; 9. edited facts ---------------------------------------------------------
@pytest.mark.parametrize("changes, message", [
    ({Keys.PRUNER_KEEP: 16}, r"vision.onnx: output 'image_tokens' has K=8, the manifest says pruner.keep=16"),
    ({Keys.LLM_NUM_LAYERS: 3}, r"decoder.onnx: the decoder takes 4 past key/value inputs, the manifest's "
                               r"llm.num_layers=3 needs 6"),
    ({Keys.LLM_HIDDEN_SIZE: 32}, r"decoder input 'inputs_embeds' .* has 64 at axis 2, the manifest says 32"),
    ({Keys.LLM_NUM_KV_HEADS: 4}, r"past key/values .* has 2 at axis 1, the manifest says 4"),
    ({Keys.LLM_VOCAB_SIZE: 100}, r"decoder output 'logits' .* has 260 at axis -1, the manifest says 100"),
    ({Keys.LLM_DTYPE: "float16"}, r"decoder input inputs_embeds is float32, the manifest's llm.dtype is float16"),
    ({Keys.VISION_BATCH: 2}, r"input 'pixels' has shape \['dynamic', 3, 336, 336\], the manifest says \[2, 3, 336"),
    ({Keys.POSITIONS_ROPE: "mrope"}, r"position mode 'compact' with M-RoPE"),
])
def test_inspect_refuses_a_manifest_the_graphs_contradict(bundle_copy, capsys, changes, message):
    edit_manifest(bundle_copy, **changes)              # the graphs are untouched: their hashes still match
    assert main(["inspect", str(bundle_copy)]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("edgeprune inspect: error: ")
    assert re.search(message, err), err
    with pytest.raises(BundleError):
        Pipeline(bundle_copy, threads=1)               # run refuses the same bundle


@pytest.mark.parametrize("changes, message", [
    ({Keys.PRUNER_KEEP: "eight"}, r'pruner.keep="eight": expected an integer >= 1'),
    ({Keys.LLM_DTYPE: "float64"}, r"llm.dtype=\"float64\": expected 'float32' or 'float16'"),
    ({Keys.LLM_NUM_LAYERS: 2.5}, r"llm.num_layers=2.5: expected an integer >= 1"),
    ({Keys.POSITIONS_MODE: "diagonal"}, r"position mode 'diagonal'; expected one of original, compact"),
    ({Keys.MODEL_NUM_IMAGE_TOKENS: 500}, r"model.num_image_tokens=500 but model.grid=\[24, 24\] has 576 cells"),
    ({Keys.PRUNER_KEEP: 600}, r"pruner.keep=600 exceeds model.num_image_tokens=576"),
    ({Keys.MODEL_DOMAIN: ["garments"]}, r'model.domain=\["garments"\]: expected a string or null'),
])
def test_wrong_types_and_values_are_one_line(bundle_copy, capsys, changes, message):
    edit_manifest(bundle_copy, **changes)
    for command in (["inspect", str(bundle_copy)], ["run", str(bundle_copy), "--image", "x.png", "--prompt", "hi"]):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_a_stated_domain_passes_the_checks_and_inspect_shows_it(bundle_copy, capsys):
    edit_manifest(bundle_copy, **{Keys.MODEL_DOMAIN: "ten test garments"})
    assert main(["inspect", str(bundle_copy)]) == 0
    assert "domain:    trained to recognise ten test garments" in capsys.readouterr().out
    assert load_bundle(bundle_copy).domain == "ten test garments"


def test_positions_outside_n_are_caught_at_run_time(tiny_bundle, monkeypatch):
    """An N edited together with the grid passes the manifest checks; the graph's positions give it away."""
    pipe = Pipeline(tiny_bundle, threads=1)
    monkeypatch.setitem(pipe.buckets[0], "num_image_tokens", 4)       # K = 8 distinct positions cannot fit in 4
    with pytest.raises(BundleError, match=r"positions up to \d+, outside 0..N-1 for the manifest's N = \[4\]"):
        pipe(np.zeros((8, 8, 3), np.uint8), "hi", max_new_tokens=1)
