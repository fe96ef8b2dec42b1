"""Bundle writing (export/bundle.py) and reading (runtime/bundle.py): manifest contents, hashes,
atomic replacement and --force, and the clear errors a tampered or mismatched bundle raises."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from edgeprune.errors import BundleError, EdgepruneError, PrunerConfigError
from edgeprune.export import bundle as bundle_mod
from edgeprune.export.bundle import _store_config, effective_config, export_bundle
from edgeprune.runtime.bundle import hash_files, load_bundle, read_manifest, sha256_file
from edgeprune.runtime.format import (PASSED, SCHEMA_VERSION, Files, Graph, Keys, llm_keys, required_keys,
                                      write_manifest)
from edgeprune.runtime.llm import llm_files

METHOD = "dart"


@pytest.fixture(scope="module")
def adapter():
    from edgeprune.models import load

    return load("tiny-llava")


@pytest.fixture(scope="module")
def exported(adapter, tmp_path_factory):
    """One validated bundle (K=16), exported once; tests that modify it work on a copy."""
    out = tmp_path_factory.mktemp("bundles") / "dart16"
    manifest = export_bundle(adapter, out, method=METHOD, keep=16, source="tiny-llava")
    return out, manifest


@pytest.fixture
def copy(exported, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(exported[0], out)
    return out


def _edit_manifest(path, **changes):
    m = json.loads((path / Files.MANIFEST).read_text())
    m.update(changes)
    (path / Files.MANIFEST).write_text(json.dumps(m))   # as a user (or another tool) would: no checks


def test_manifest_contents(exported, adapter):
    out, m = exported
    assert json.loads((out / Files.MANIFEST).read_text()) == m
    assert all(key in m for key in required_keys())
    assert m[Keys.SCHEMA_VERSION] == SCHEMA_VERSION
    assert m[Keys.MODEL_FAMILY] == "llava" and m[Keys.MODEL_SOURCE] == "tiny-llava"
    assert m[Keys.PRUNER_METHOD] == METHOD and m[Keys.PRUNER_KEEP] == 16
    assert m[Keys.MODEL_NUM_IMAGE_TOKENS] == 576 and m[Keys.MODEL_GRID] == [24, 24]
    assert m[Keys.PRUNER_CONFIG] == {"pivots": 8}                       # dart's default, recorded
    # DART's own convention (original ids) wins over the tiny preset's default (compact)
    assert adapter.default_positions == "compact" and m[Keys.POSITIONS_MODE] == "original"
    assert m[Keys.MODEL_EOS_TOKEN_IDS] == list(adapter.eos_token_ids)
    assert m[Keys.MODEL_CHAT_TEMPLATE] == adapter.chat_template.to_dict()
    assert m[Keys.VISION_GRAPH]["outputs"]["positions"] == {"shape": ["batch", 16], "dtype": "int64"}
    assert m[Keys.VISION_BATCH] is None
    assert m[Keys.LLM_DECODER_GRAPH][Graph.FILE] == Files.DECODER
    # every file but the manifest is hashed, and the hashes are right
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert sorted(m[Keys.FILES_SHA256]) == [f for f in on_disk if f != Files.MANIFEST]
    assert {Files.VISION, Files.DECODER, Files.TOKENIZER, Files.PREPROCESS} <= set(m[Keys.FILES_SHA256])
    assert set(llm_files(m)) <= set(m[Keys.FILES_SHA256])   # decoder, its data, the embedding table
    assert all(sha256_file(out / f) == h for f, h in m[Keys.FILES_SHA256].items())
    # validation stored: vision parity and the LLM's own report
    v = m[Keys.VALIDATION_VISION]
    assert v[PASSED] and v["positions_equal"] and v["max_abs_diff"] < 1e-3
    assert m[Keys.VALIDATION_LLM][PASSED] and m[Keys.VALIDATION_LLM]["prefill"] < 1e-3
    # the tokenizer and preprocessing are the adapter's
    assert (out / Files.TOKENIZER).read_text() == adapter.tokenizer_json()
    assert json.loads((out / Files.PREPROCESS).read_text())["size"] == [336, 336]
    assert not list(out.parent.glob(f".{out.name}.*"))                 # no temp folder left beside it


def test_load_bundle_reads_what_export_wrote(exported):
    b = load_bundle(exported[0])
    assert b.keep == 16 and b.num_image_tokens == 576 and b.extra_outputs == []
    assert b.preprocess.size == (336, 336) and "{prompt}" in b.chat_template.suffix


def test_existing_bundle_needs_force(exported, adapter, copy, monkeypatch):
    before = sha256_file(copy / Files.VISION)
    with pytest.raises(BundleError, match=r"already exists.*--force"):
        export_bundle(adapter, copy, method=METHOD, keep=16)
    # force=True: a failure half-way leaves the old bundle untouched and no temp folder
    def broken(*args, **kw):
        raise RuntimeError("disk full")
    monkeypatch.setattr("edgeprune.export.llm.export_llm", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_bundle(adapter, copy, method="attention", keep=8, force=True, validate=False)
    assert sha256_file(copy / Files.VISION) == before
    assert read_manifest(copy)[Keys.PRUNER_METHOD] == METHOD
    assert sorted(p.name for p in copy.parent.iterdir()) == ["copy"]
    monkeypatch.undo()
    # force=True replaces it
    m = export_bundle(adapter, copy, method="attention", keep=8, force=True, validate=False)
    assert m[Keys.PRUNER_KEEP] == 8 and read_manifest(copy)[Keys.PRUNER_METHOD] == "attention"
    assert load_bundle(copy).keep == 8


def test_non_bundle_folder_is_never_replaced(adapter, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="not an edgeprune bundle"):
        export_bundle(adapter, tmp_path, method=METHOD, keep=16, force=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_bad_options_fail_before_writing(adapter, tmp_path):
    with pytest.raises(PrunerConfigError, match="dart: unknown option"):
        export_bundle(adapter, tmp_path / "b", method=METHOD, keep=16, cfg={"pivotz": 3})
    with pytest.raises(PrunerConfigError, match="keep=577"):
        export_bundle(adapter, tmp_path / "b", method=METHOD, keep=577)
    with pytest.raises(bundle_mod.EdgepruneError, match="positions='diagonal'"):
        export_bundle(adapter, tmp_path / "b", method=METHOD, keep=16, positions="diagonal")
    assert list(tmp_path.iterdir()) == []


def test_config_values_stored_as_json_or_file(adapter, tmp_path):
    cfg = {"alpha": 0.5, "pair": (1, 2), "bias": torch.arange(6.0).reshape(2, 3), "fn": print}
    stored, omitted = _store_config(cfg, tmp_path)
    assert stored["alpha"] == 0.5 and stored["pair"] == [1, 2]
    assert stored["bias"] == {"file": "pruner/bias.npy", "shape": [2, 3], "dtype": "float32"}
    np.testing.assert_array_equal(np.load(tmp_path / "pruner" / "bias.npy"), np.arange(6.0).reshape(2, 3))
    assert "fn" not in stored and "not JSON-serialisable" in omitted["fn"]
    # model facts go in only for options the method accepts (adbts reads pixel_mean; dart does not)
    assert "pixel_mean" not in effective_config("dart", adapter, {})
    assert effective_config("dart", adapter, {"pivots": 4}) == {"pivots": 4}


# -- the runtime refuses bad bundles, naming the file or key ---------------------------------------------
def test_hash_mismatch_is_named(copy):
    with open(copy / Files.TOKENIZER, "a") as f:
        f.write(" ")
    with pytest.raises(BundleError, match=r"tokenizer\.json: sha256 .* does not match"):
        load_bundle(copy)


def test_missing_file_is_named(copy):
    (copy / Files.DECODER).unlink()
    with pytest.raises(BundleError, match=r"decoder\.onnx: missing"):
        load_bundle(copy)


def test_missing_manifest_key_and_schema(copy):
    m = json.loads((copy / Files.MANIFEST).read_text())
    del m[Keys.PRUNER_KEEP]
    with pytest.raises(BundleError, match=r"lacks required key\(s\) pruner\.keep"):
        write_manifest(copy, m)                      # the writer refuses an incomplete manifest
    (copy / Files.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"manifest\.json: missing key\(s\) pruner\.keep"):
        load_bundle(copy)
    _edit_manifest(copy, **{Keys.SCHEMA_VERSION: SCHEMA_VERSION + 1, Keys.PRUNER_KEEP: 16})
    with pytest.raises(BundleError, match=rf"manifest\.json: schema {SCHEMA_VERSION + 1}, this runtime reads "
                                          rf"1-{SCHEMA_VERSION}; upgrade edgeprune"):
        load_bundle(copy)
    (copy / Files.MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="manifest.json: not valid JSON"):
        load_bundle(copy)
    (copy / Files.MANIFEST).unlink()
    with pytest.raises(BundleError, match="manifest.json: missing"):
        load_bundle(copy)


def test_wrong_k_in_manifest_vs_graph(copy):
    from edgeprune.runtime.pipeline import Pipeline

    _edit_manifest(copy, **{Keys.PRUNER_KEEP: 32})   # the manifest is not hashed; the graph says 16
    with pytest.raises(BundleError, match=r"vision\.onnx: output 'image_tokens' has K=16, the manifest says "
                                          r"pruner\.keep=32"):
        Pipeline(copy)
    _edit_manifest(copy, **{Keys.PRUNER_KEEP: 16, Keys.PRUNER_EXTRA_OUTPUTS: ["gate"]})
    with pytest.raises(BundleError, match=r"outputs .* the manifest expects"):
        Pipeline(copy)


def test_hash_files_skips_manifest_and_sorts(tmp_path):
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("a")
    (tmp_path / Files.MANIFEST).write_text("{}")
    (tmp_path / Files.ORT_TRT_CACHE).mkdir(parents=True)
    (tmp_path / Files.ORT_TRT_CACHE / "x.engine").write_text("written by onnxruntime at run time")
    assert list(hash_files(tmp_path)) == ["b.txt", "sub/a.txt"]
    assert list(hash_files(tmp_path, ["sub/a.txt"])) == ["sub/a.txt"]


def test_reuse_llm_links_the_graphs_and_checks_they_fit(exported, adapter, tmp_path):
    exported = exported[0]
    manifest = export_bundle(adapter, tmp_path / "reused", method="uniform", keep=16, validate=False,
                             source="tiny-llava", reuse_llm_from=exported)
    source = load_bundle(exported).manifest
    assert all(manifest[k] == source[k] for k in llm_keys())
    decoder = manifest[Keys.LLM_DECODER_GRAPH][Graph.FILE]
    assert manifest[Keys.FILES_SHA256][decoder] == source[Keys.FILES_SHA256][decoder]
    load_bundle(tmp_path / "reused")  # hashes verify
    assert manifest[Keys.POSITIONS_MODE] == adapter.default_positions  # uniform has no convention of its own
    with pytest.raises(EdgepruneError, match=r"reuse_llm_from=.*\(family, source, precision, attention\).*this "
                                             r"export needs .*'int4'"):
        export_bundle(adapter, tmp_path / "int4", method="uniform", keep=16, llm_precision="int4", validate=False,
                      source="tiny-llava", reuse_llm_from=exported)
    assert not (tmp_path / "int4").exists()


def test_domain_is_recorded_when_the_adapter_states_one(exported, adapter, tmp_path, monkeypatch):
    assert exported[1][Keys.MODEL_DOMAIN] is None and load_bundle(exported[0]).domain is None  # tiny-llava states none
    monkeypatch.setattr(type(adapter), "domain", "ten test garments")
    manifest = export_bundle(adapter, tmp_path / "b", method="uniform", keep=16, validate=False,
                             source="tiny-llava", reuse_llm_from=exported[0])
    assert manifest[Keys.MODEL_DOMAIN] == "ten test garments"
    assert load_bundle(tmp_path / "b").domain == "ten test garments"
