"""The bundle format (runtime/format.py): round trip, key coverage (every key a reader uses is one a fresh
export writes), the rule that code names keys only through format.Keys, and reading schema-1 bundles."""
from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

from edgeprune.errors import BundleError
from edgeprune.runtime import format as fmt
from edgeprune.runtime.bundle import hash_files
from edgeprune.runtime.format import PASSED, SCHEMA_VERSION, EmbedTable, Files, Graph, Key, Keys

ROOT = Path(__file__).resolve().parents[2]
V1_MANIFEST = ROOT / "tests" / "data" / "manifest_v1_tiny_llava.json"   # written by edgeprune at schema 1:
# tiny-llava, method attention, K=16, validated, exported with the same call as `fresh` below
PACKAGE = ("edgeprune", "export", "runtime", "profiles")
READERS = ("runtime", "profiles", "edgeprune/cli", "export/engine.py")   # code that reads bundles
# what a schema-1 export wrote differently: embed.onnx, no embedding table, separate past/present arrays, no
# precision, quantization, oldest onnxruntime or parameter count
SCHEMA1_LLM = {Keys.LLM_EMBED_GRAPH, Keys.LLM_EMBED_TABLE, Keys.LLM_KV_CACHE, Keys.LLM_PRECISION,
               Keys.LLM_QUANTIZATION, Keys.LLM_MIN_ONNXRUNTIME, Keys.LLM_NUM_PARAMETERS}
SCHEMA1_UNKNOWN = {Keys.LLM_NUM_HEADS, Keys.LLM_INTERMEDIATE_SIZE, Keys.LLM_CONTEXT_LENGTH, Keys.VISION_NUM_LAYERS,
                   Keys.VISION_HIDDEN_SIZE, Keys.VISION_TOKENS_PER_VIEW, Keys.VISION_VIEWS}


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A bundle exported now with the call that wrote the schema-1 fixture: (folder, manifest as written)."""
    from edgeprune.export.bundle import export_bundle
    from edgeprune.models import load

    out = tmp_path_factory.mktemp("format") / "bundle"
    export_bundle(load("tiny-llava"), out, method="attention", keep=16, validate=True)
    return out, json.loads((out / Files.MANIFEST).read_text())


def _all_keys() -> set[str]:
    return {str(k) for k in fmt.required_keys() + fmt.optional_keys()}


def _sources(*roots: str):
    for root in roots:
        path = ROOT / root
        for file in sorted([path] if path.is_file() else path.rglob("*.py")):
            if file != ROOT / "runtime" / "format.py":
                yield file, ast.parse(file.read_text(), filename=str(file))


def _keys_used(tree) -> set[str]:
    """`Keys.NAME` attributes referenced in a module."""
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "Keys"}


# -- writing and reading ---------------------------------------------------------------------------------
def test_fresh_manifest_has_every_key_and_round_trips(fresh, tmp_path):
    out, written = fresh
    assert set(written) == _all_keys()                     # every declared key written; nothing undeclared
    assert written[Keys.FORMAT] == fmt.FORMAT and written[Keys.SCHEMA_VERSION] == SCHEMA_VERSION == 2
    read = fmt.read(json.loads(json.dumps(written)))
    assert read == written                                 # nothing migrated or defaulted in a fresh bundle
    again = fmt.write_manifest(tmp_path, read)
    assert json.loads((tmp_path / Files.MANIFEST).read_text()) == again == written


def test_keys_readers_use_are_written_by_a_fresh_export(fresh):
    """Walk the `Keys.X` references of every module that reads bundles: each names a declared key, and a
    fresh manifest holds it with a value (optional keys: present, the reader gets the default when null;
    vision.batch: null = a dynamic batch)."""
    _, written = fresh
    used = set().union(*(_keys_used(tree) for _, tree in _sources(*READERS)))
    assert {"LLM_NUM_HEADS", "LLM_INTERMEDIATE_SIZE", "VISION_NUM_LAYERS", "ENGINE_VISION"} <= used  # the walk works
    undeclared = sorted(name for name in used if not isinstance(getattr(Keys, name, None), Key))
    assert undeclared == []
    for name in used:
        key = getattr(Keys, name)
        assert key in written, name
        assert key.optional or key == Keys.VISION_BATCH or written[key] is not None, f"{key}: written as null"


def test_code_names_keys_only_through_the_format_module():
    """No manifest key spelled as a string outside runtime/format.py, and no `.get(Keys.X)` (read() fills
    every optional key's default, so a .get default would only hide a key nothing writes)."""
    names = _all_keys() | {"llm.spec"}
    literals, gets = [], []
    for file, tree in _sources(*PACKAGE):
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in names:
                literals.append(f"{file.relative_to(ROOT)}:{node.lineno} {node.value!r}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                    and node.args and _keys_used(node.args[0])):
                gets.append(f"{file.relative_to(ROOT)}:{node.lineno}")
    assert literals == [] and gets == []


def test_write_manifest_stamps_the_version_and_refuses_a_missing_key(fresh, tmp_path):
    _, written = fresh
    old = {**written, Keys.SCHEMA_VERSION: 1}
    del old[Keys.FORMAT]
    assert fmt.write_manifest(tmp_path, old)[Keys.SCHEMA_VERSION] == SCHEMA_VERSION
    incomplete = {k: v for k, v in written.items() if k != Keys.LLM_INTERMEDIATE_SIZE}
    with pytest.raises(BundleError, match="lacks required key.*llm.intermediate_size"):
        fmt.write_manifest(tmp_path, incomplete)


@pytest.mark.parametrize("change, message", [
    ({Keys.SCHEMA_VERSION: 3}, r"schema 3, this runtime reads 1-2; upgrade edgeprune"),
    ({Keys.SCHEMA_VERSION: 0}, r"schema 0, this runtime reads 1-2"),
    ({Keys.SCHEMA_VERSION: "2"}, r"schema '2', this runtime reads 1-2"),
    ({Keys.FORMAT: "gguf"}, r"general.format='gguf': not an edgeprune bundle"),
    ({Keys.FORMAT: None}, r"not an edgeprune bundle manifest \(general.format absent"),
])
def test_reader_refuses_what_it_cannot_read(fresh, change, message):
    manifest = {k: v for k, v in {**fresh[1], **change}.items() if v is not None}
    with pytest.raises(BundleError, match=f"where.json: {message}"):
        fmt.read(manifest, where="where.json")


def test_optional_keys_absent_read_as_their_defaults(fresh):
    manifest = {k: v for k, v in fresh[1].items() if not getattr(Keys, _attr(k)).optional}
    read = fmt.read(manifest)
    assert read[Keys.VISION_BUCKETS] is None and read[Keys.PRUNER_CONFIG_OMITTED] == {}
    assert read[Keys.MODEL_SOURCE] == "" and read[Keys.ENGINE_VISION] is None
    read[Keys.PRUNER_CONFIG_OMITTED]["x"] = 1
    assert Keys.PRUNER_CONFIG_OMITTED.default == {}        # defaults are copied, never shared


def _attr(key: str) -> str:
    return next(name for name, value in vars(Keys).items() if value == key)


# -- schema 1 ----------------------------------------------------------------------------------------------
def test_schema1_manifest_migrates_to_what_export_writes_now(fresh):
    """The schema-1 manifest of the same export, read now, equals the fresh one except the facts schema 1
    never recorded (None), its version and creation time."""
    _, written = fresh
    old = json.loads(V1_MANIFEST.read_text())
    assert Keys.FORMAT not in old and "llm.spec" in old and old["validation"]["llm"]["ok"] is True
    read = fmt.read(old)
    assert set(read) == set(written)
    assert read[Keys.SCHEMA_VERSION] == 1 and all(read[k] is fmt.UNKNOWN for k in SCHEMA1_UNKNOWN)
    stable = set(written) - SCHEMA1_UNKNOWN - SCHEMA1_LLM - {Keys.CREATED, Keys.SCHEMA_VERSION,
                                                             Keys.EDGEPRUNE_VERSION, Keys.FILES_SHA256,
                                                             Keys.VALIDATION_VISION, Keys.VALIDATION_LLM}
    assert {k: read[k] for k in stable} == {k: written[k] for k in stable}
    # graph records of the LLM: schema 1 had shapes only, the dtypes come from the names
    assert read[Keys.LLM_DECODER_GRAPH][Graph.INPUTS] == written[Keys.LLM_DECODER_GRAPH][Graph.INPUTS]
    # schema 1's LLM: an embed graph, past and present as separate arrays, the dtype's precision
    assert read[Keys.LLM_EMBED_GRAPH][Graph.FILE] == Files.EMBED and read[Keys.LLM_EMBED_TABLE] is None
    assert (read[Keys.LLM_KV_CACHE], fmt.llm_precision(read)) == ("separate", "fp32")
    assert read[Keys.VALIDATION_LLM][PASSED] is True and "ok" not in read[Keys.VALIDATION_LLM]
    assert read[Keys.VALIDATION_VISION][PASSED] is True
    # older schema-1 bundles: no positions.rope (1-D), an engine without device facts, no validation
    older = {k: v for k, v in old.items() if k not in (Keys.POSITIONS_ROPE, "validation")}
    older["engines"] = {"vision": {"file": Files.VISION_ENGINE, "tensorrt_version": "8.5.2", "precision": "fp16"}}
    read = fmt.read(older)
    assert read[Keys.POSITIONS_ROPE] == "1d" and read[Keys.VALIDATION_LLM] is None
    assert read[Keys.ENGINE_VISION]["tensorrt_version"] == "8.5.2"
    with pytest.raises(BundleError, match="schema 1 llm.spec lacks 'head_dim'"):
        fmt.read({**old, "llm.spec": {k: v for k, v in old["llm.spec"].items() if k != "head_dim"}})


def test_schema1_bundle_runs_and_says_what_it_lacks(fresh, tmp_path):
    """A schema-1 bundle on disk loads and generates the same tokens; the planner, which needs a fact
    schema 1 never recorded, names it and says to re-export."""
    from PIL import Image

    from edgeprune.cli import main
    from edgeprune.export.validate import seeded_images
    from edgeprune.profiles.planner import facts_from_bundle
    from edgeprune.runtime.pipeline import Pipeline

    src, written = fresh
    old = tmp_path / "v1"
    shutil.copytree(src, old)
    _legacy_embed_graph(old, written)                          # schema 1 looked tokens up with embed.onnx
    manifest = json.loads(V1_MANIFEST.read_text())
    manifest[Keys.FILES_SHA256] = hash_files(old, [rel for rel in written[Keys.FILES_SHA256] if rel != Files.EMBED_TABLE]
                                             + [Files.EMBED])   # the same graphs; hashes of this machine's export
    (old / Files.EMBED_TABLE).unlink()
    (old / Files.MANIFEST).write_text(json.dumps(manifest))
    image = Image.fromarray(seeded_images((336, 336), 1, seed=3)[0])
    want = Pipeline(src, threads=1)(image, "What is it?", max_new_tokens=4).ids
    assert Pipeline(old, threads=1)(image, "What is it?", max_new_tokens=4).ids == want
    with pytest.raises(BundleError, match=r"llm.num_heads is not recorded in this schema-1 bundle; re-export"):
        facts_from_bundle(old)
    assert facts_from_bundle(src).intermediate_size == 128 and facts_from_bundle(src).vision_layers == 3
    assert main(["inspect", str(old)]) == 0


def _legacy_embed_graph(folder, manifest: dict) -> None:
    """embed.onnx as schema-1 exports wrote it (input_ids -> inputs_embeds, a Gather over the table), built from the
    fresh bundle's untied table (embed.bin)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = manifest[Keys.LLM_EMBED_TABLE]
    weight = np.fromfile(folder / table[EmbedTable.FILE], dtype=table[EmbedTable.DTYPE]).reshape(table[EmbedTable.SHAPE])
    graph = helper.make_graph([helper.make_node("Gather", ["weight", "input_ids"], ["inputs_embeds"])], "embed",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
                              [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT,
                                                             ["batch", "sequence", weight.shape[1]])],
                              [numpy_helper.from_array(weight, "weight")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / Files.EMBED))
