"""The runtime pipeline (runtime/pipeline.py) against the torch reference (edgeprune/reference.py):
greedy tokens identical for 16 new tokens, both position modes, batch 1 and 2; sampling with a seed,
streaming, EOS, extras and batch errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgeprune.errors import ModelError
from edgeprune.export.bundle import export_bundle
from edgeprune.export.validate import seeded_images
from edgeprune.pruners import Pruner, Selection, available, build_for_model
from edgeprune.pruners._registry import _PRUNERS
from edgeprune.pruners.ops import gather_rows, sort_by_position, topk_indices
from edgeprune.reference import generate
from edgeprune.runtime.format import PASSED, Files, Keys
from edgeprune.runtime.pipeline import Pipeline
from tests.conftest import baseline_options

TARGETS = ("dart", "divprune", "visionzip", "autoselect")
METHODS = [m for m in TARGETS if m in available()] or ["attention", "uniform"]
MODES = ("original", "compact")
KEEP = 32
PROMPT = "What is shown here?"
NEW = 16


@pytest.fixture(scope="module")
def adapter():
    from edgeprune.models import load

    return load("tiny-llava")


@pytest.fixture(scope="module")
def images(adapter):
    return seeded_images(adapter.preprocess_config.size, 2, seed=11)


class _Bundles:
    """Module-scoped cache: one export per (method, mode), shared by every test that needs it."""

    def __init__(self, adapter, root):
        self.adapter, self.root, self.paths = adapter, root, {}

    def get(self, method: str, mode: str):
        key = (method, mode)
        if key not in self.paths:
            out = self.root / f"{method}-{mode}"
            # parity of each graph is tested elsewhere (test_vision, test_bundle): skip it here for speed
            export_bundle(self.adapter, out, method=method, keep=KEEP, positions=mode, validate=False,
                          cfg=baseline_options(method))
            self.paths[key] = out
        return self.paths[key]


@pytest.fixture(scope="module")
def bundles(adapter, tmp_path_factory):
    return _Bundles(adapter, tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="module")
def pipelines(bundles):
    cache = {}

    def get(method, mode):
        if (method, mode) not in cache:
            cache[method, mode] = Pipeline(bundles.get(method, mode), threads=1)
        return cache[method, mode]
    return get


def _reference(adapter, method, mode, images, **kw):
    pruner = build_for_model(method, KEEP, adapter.pruner_options(), **baseline_options(method))
    return generate(adapter, pruner, images, PROMPT, max_new_tokens=NEW, positions=mode, **kw)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_greedy_tokens_match_reference(method, mode, adapter, images, pipelines):
    pipe = pipelines(method, mode)
    for batch in (images[:1], images):          # batch 1 and batch 2
        ref = _reference(adapter, method, mode, batch)
        got = pipe(batch, PROMPT, max_new_tokens=NEW)
        np.testing.assert_array_equal(got.positions, ref.image_positions, err_msg=f"{method}/{mode} positions")
        assert got.ids == ref.ids, f"{method}/{mode} batch {len(batch)}: runtime {got.ids} vs torch {ref.ids}"
        assert got.texts == ref.text
        assert all(len(row) == NEW for row in got.ids)  # tiny-llava's EOS logit is zeroed: no early stop
        assert got.num_prompt_tokens == ref.position_ids.shape[1]


def test_reference_with_the_exported_llm_equals_the_pipeline(adapter, images, pipelines):
    """generate(llm=OrtLLM) (how `eval --llm` measures an exported precision): torch vision and pruning, the
    runtime's LLM; the same tokens as the whole runtime pipeline."""
    pipe = pipelines(METHODS[0], "compact")
    got = _reference(adapter, METHODS[0], "compact", images, llm=pipe.llm)
    assert got.ids == pipe(images, PROMPT, max_new_tokens=NEW).ids


def test_positions_mode_changes_what_the_llm_sees(pipelines, images):
    """Same graphs, different position rule: prefill positions differ, so (almost surely) the logits do."""
    a = pipelines(METHODS[0], "original")(images[:1], PROMPT, max_new_tokens=NEW)
    b = pipelines(METHODS[0], "compact")(images[:1], PROMPT, max_new_tokens=NEW)
    np.testing.assert_array_equal(a.positions, b.positions)
    assert a.ids != b.ids


def test_batch_rows_equal_single_runs(pipelines, images):
    pipe = pipelines(METHODS[0], "compact")
    both = pipe(images, PROMPT, max_new_tokens=NEW)
    for i, image in enumerate(images):
        alone = pipe(image, PROMPT, max_new_tokens=NEW)
        assert alone.ids[0] == both.ids[i]


def test_rows_with_different_prompts_equal_single_requests(pipelines, images):
    """The server's batched entry point: a prompt per row, of different lengths; each row's greedy tokens
    equal the single request's (and a repeated row its twin's)."""
    pipe = pipelines(METHODS[0], "original")
    prompts = ["Describe it.", "What colour is the large object in the middle of this picture?", "Describe it."]
    rows = [images[0], images[1], images[1]]
    got = pipe.generate_rows(rows, prompts, max_new_tokens=NEW)
    lengths = got.prompt_lengths
    assert lengths[0] == lengths[2] < lengths[1] == got.num_prompt_tokens
    for i, (image, prompt) in enumerate(zip(rows, prompts)):
        alone = pipe(image, prompt, max_new_tokens=NEW)
        assert got.ids[i] == alone.ids[0], f"row {i}: batched {got.ids[i]} vs alone {alone.ids[0]}"
        assert got.texts[i] == alone.texts[0]
        np.testing.assert_array_equal(got.positions[i], alone.positions[0])
        assert alone.prompt_lengths == [lengths[i]]
    assert got.ids[1] != got.ids[2]                 # the prompt reaches its row
    with pytest.raises(ModelError, match="one prompt per image"):
        pipe.generate_rows(rows, prompts[:2])


def test_sampling_matches_reference_and_is_seeded(adapter, images, pipelines):
    method, mode = METHODS[0], "compact"
    pipe = pipelines(method, mode)
    kw = dict(do_sample=True, top_p=0.9, temperature=1.0, seed=123)
    got = pipe(images, PROMPT, max_new_tokens=NEW, **kw)
    ref = _reference(adapter, method, mode, images, **kw)
    assert got.ids == ref.ids
    assert pipe(images, PROMPT, max_new_tokens=NEW, **kw).ids == got.ids
    assert pipe(images, PROMPT, max_new_tokens=NEW, **{**kw, "seed": 124}).ids != got.ids


def test_streaming_pieces_concatenate_to_text(pipelines, images):
    pieces = {0: [], 1: []}
    result = pipelines(METHODS[0], "compact")(images, PROMPT, max_new_tokens=NEW,
                                              on_text=lambda row, piece: pieces[row].append(piece))
    for row in (0, 1):
        assert "".join(pieces[row]) == result.texts[row]
    assert set(result.timings) == {"preprocess", "vision", "embed", "prefill", "decode"}
    assert all(v >= 0 for v in result.timings.values()) and len(result.decode_steps) == NEW - 1


def test_stops_at_eos(bundles, images, tmp_path):
    import shutil

    path = tmp_path / "eos"
    shutil.copytree(bundles.get(METHODS[0], "compact"), path)
    first = Pipeline(path, threads=1)(images[:1], PROMPT, max_new_tokens=NEW).ids[0]
    eos = first[2]                                   # make the third generated token an EOS
    m = json.loads((path / Files.MANIFEST).read_text())
    m[Keys.MODEL_EOS_TOKEN_IDS] = [eos]              # the manifest is not hashed: this is a config edit
    (path / Files.MANIFEST).write_text(json.dumps(m))
    got = Pipeline(path, threads=1)(images[:1], PROMPT, max_new_tokens=NEW)
    stop = first.index(eos)
    assert got.ids[0] == first[:stop + 1]


def test_fixed_batch_bundle_rejects_other_batch(adapter, images, tmp_path):
    out = tmp_path / "b1"
    export_bundle(adapter, out, method="attention", keep=8, batch=1, validate=False)
    pipe = Pipeline(out, threads=1)
    assert len(pipe(images[0], PROMPT, max_new_tokens=2).ids) == 1
    with pytest.raises(ModelError, match=r"2 image\(s\) given; this bundle's vision graph takes exactly 1"):
        pipe(images, PROMPT, max_new_tokens=2)


class _GatePruner(Pruner):
    """A stand-in with an extra output (registered only inside the test)."""

    requires = ("tokens", "attn")
    extra_outputs = ("gate",)

    def select(self, tokens, attn):                                   # [B, N, D], [B, N]
        chosen = topk_indices(attn, self.keep)
        positions, kept = sort_by_position(chosen, gather_rows(tokens, chosen))
        return Selection(tokens=kept, positions=positions, extras={"gate": attn.max(dim=1).values})


def test_extras_reach_the_result(adapter, images, tmp_path, monkeypatch):
    monkeypatch.setitem(_PRUNERS, "gate_probe", _GatePruner)
    monkeypatch.setattr(_GatePruner, "name", "gate_probe")
    out = tmp_path / "gate"
    m = export_bundle(adapter, out, method="gate_probe", keep=8)
    assert m[Keys.PRUNER_EXTRA_OUTPUTS] == ["gate"] and "gate" in m[Keys.VISION_GRAPH]["outputs"]
    result = Pipeline(out, threads=1)(images, PROMPT, max_new_tokens=2)
    with torch.no_grad():
        attn = adapter.encode(adapter.preprocess(images), ("attn",)).attn
    np.testing.assert_allclose(result.extras["gate"], attn.max(dim=1).values.numpy(), rtol=1e-5)


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_llm_precision_bundle_runs(precision, adapter, images, bundles, tmp_path):
    """Each precision exports, validates (teacher-forced greedy agreement with torch float32 on three real text
    prompts and two with the pruned image tokens of a real photo, above the garbage bound) and runs; fp16 answers as
    the fp32 bundle does. int8/int4 tokens of this tiny random model (flat logits) diverge from fp32 after a flipped
    near-tie: their bound is the validation's."""
    out = tmp_path / precision
    m = export_bundle(adapter, out, method=METHODS[0], keep=KEEP, llm_precision=precision)
    assert m[Keys.LLM_PRECISION] == precision and m[Keys.VALIDATION_VISION][PASSED]
    report = m[Keys.VALIDATION_LLM]
    assert report[PASSED] and (report["greedy_tokens"], report["greedy_tokens_image"]) == (5 * 16, 2 * 16)
    assert min(report["greedy_agreement"], report["greedy_agreement_image"]) >= report["min_agreement"], report
    assert (m[Keys.LLM_QUANTIZATION] is None) == (precision == "fp16")
    assert m[Keys.LLM_DTYPE] == ("float16" if precision == "fp16" else "float32")
    result = Pipeline(out, threads=1)(images, PROMPT, max_new_tokens=NEW)
    fp32 = Pipeline(bundles.get(METHODS[0], _default_mode(adapter)), threads=1)(images, PROMPT, max_new_tokens=NEW)
    np.testing.assert_array_equal(result.positions, fp32.positions)   # the same float32 vision graph
    assert [len(row) for row in result.ids] == [NEW, NEW]
    if precision == "fp16":
        assert result.ids == fp32.ids


def _default_mode(adapter) -> str:
    method = METHODS[0]
    return available()[method].default_positions or adapter.default_positions
