"""In-LLM stages exported and run (METHODS_INLLM.md §12) on the tiny presets (LLaVA and Qwen2-VL M-RoPE, 4 LLM
layers): prefill.onnx vs the torch reference (exact kept slots, logits), the ORT LLM's greedy tokens vs
`edgeprune generate`'s for every method with per-row prompts, KV lengths per policy, one weights copy; then
two whole bundles through the runtime pipeline, the manifest and the profiler."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from skimage import data

from edgeprune import models
from edgeprune.errors import EdgepruneError
from edgeprune.export.bundle import export_bundle
from edgeprune.export.inllm import validate_prefill
from edgeprune.export.lint import lint
from edgeprune.export.llm import export_llm
from edgeprune.inllm import build
from edgeprune.inllm.boundary import StageRunner
from edgeprune.reference import generate, prefill_inputs
from edgeprune.runtime.format import PASSED, Files, Keys
from edgeprune.runtime.llm import OrtLLM
from edgeprune.runtime.pipeline import Pipeline, _cut_at_eos

PROMPTS = ["What is in the picture?", "Describe it"]   # different lengths: the second row is right-padded
# (preset, method, keep, layer, kv_policy, attention, cfg): every method, both policies, both attention kernels
CASES = [
    ("tiny-llava", "fastv", [40], [1], "uniform", "fused", {}),
    ("tiny-llava", "dart", [24], [2], "faithful", "fused", {}),
    ("tiny-llava", "d2pruner", [20], [1], "uniform", "plain", {"alpha": 0.5, "bias": "prior"}),
    ("tiny-llava", "polymorphic", [60, 30, 12], [1, 2, 3], "faithful", "fused", {}),
    ("tiny-llava", "pdrop", None, [1, 2, 3], "uniform", "fused", {}),
    ("tiny-qwen2-vl", "fastv", [20], [1], "faithful", "fused", {}),
    ("tiny-qwen2-vl", "dart", [12], [2], "uniform", "fused", {}),
    ("tiny-qwen2-vl", "d2pruner", [10], [2], "faithful", "fused", {"alpha": 0.5}),
    ("tiny-qwen2-vl", "polymorphic", [30, 20, 12], [1, 2, 3], "uniform", "plain", {}),
    ("tiny-qwen2-vl", "pdrop", None, [1, 2, 3], "faithful", "fused", {}),
]


@pytest.fixture(scope="module")
def adapters():
    return {name: models.load(name, llm_layers=4) for name in ("tiny-llava", "tiny-qwen2-vl")}


@pytest.fixture(scope="module")
def images():
    return [data.astronaut(), data.coffee()]


def stage_for(adapter, method, keep, layer, cfg):
    cfg = dict(cfg)
    if cfg.get("bias") == "prior":   # a calibrated-looking prior [N]
        cfg["bias"] = np.random.default_rng(0).uniform(0.5, 1.5, adapter.num_image_tokens).astype(np.float32)
    return build(method, keep=keep, layer=layer, **cfg), cfg


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[4]}-{c[5]}")
def case(request, adapters, images, tmp_path_factory):
    """The LLM graphs of one case (no vision graph: the reference and the runtime get the same embeddings)."""
    preset, method, keep, layer, policy, attention, cfg = request.param
    adapter = adapters[preset]
    stage, _ = stage_for(adapter, method, keep, layer, cfg)
    inputs = prefill_inputs(adapter, None, images, PROMPTS)
    runner = StageRunner(stage, num_image=adapter.num_image_tokens, num_layers=4, image_start=len(inputs.prefix),
                         kv_policy=policy, grid=tuple(adapter.grid))
    out = tmp_path_factory.mktemp("inllm")
    spec = export_llm(adapter.llm, out, attention=attention, validate=False, rope=adapter.rope, stages=runner)
    return adapter, out, spec, runner, inputs


def test_prefill_graph_keeps_the_torch_slots_and_logits(case):
    adapter, out, spec, runner, _ = case
    check = validate_prefill(adapter.llm, runner, out, spec)
    assert check["keep_mismatch_stages"] == [], "prefill.onnx kept other image slots than the torch reference"
    assert check["prefill"] <= check["tolerance"] and check["decode"] <= check["tolerance"] and check[PASSED]


def test_runtime_greedy_tokens_equal_the_reference(case, images):
    adapter, out, spec, runner, inputs = case
    ort_llm = OrtLLM(out, spec, providers=["cpu"], stages=runner.plan())
    got = ort_llm.generate(inputs.embeds.numpy(), inputs.position_ids, lengths=inputs.attention_mask.sum(dim=1).numpy(),
                           image_positions=inputs.image_positions.numpy(), max_new_tokens=8,
                           eos_token_ids=adapter.eos_token_ids)
    ref = generate(adapter, None, images, PROMPTS, max_new_tokens=8, llm_stage=runner.method,
                   kv_policy=runner.kv_policy)
    assert _cut_at_eos(got.ids, list(adapter.eos_token_ids)) == ref.ids
    assert len(got.stage_keep) == len(runner.stages) == len(ref.stage_keep)
    for ours, theirs in zip(got.stage_keep, ref.stage_keep):
        np.testing.assert_array_equal(ours, theirs)


def test_kv_lengths_follow_the_policy(case):
    adapter, out, spec, runner, inputs = case
    ort_llm = OrtLLM(out, spec, providers=["cpu"], stages=runner.plan())
    _, present, _ = ort_llm.prefill(inputs.embeds.numpy(), inputs.position_ids, inputs.attention_mask.numpy(),
                                    inputs.image_positions.numpy())
    total, k = inputs.embeds.shape[1], adapter.num_image_tokens
    counts, layers = [k] + [s.num_out for s in runner.stages], runner.layers
    if runner.kv_policy == "uniform":
        expected = [total - k + counts[-1]] * 4
    else:   # layer i holds the sequence it ran on
        expected = [total - k + counts[sum(1 for at in layers if at <= i)] for i in range(4)]
    assert [present[2 * i].shape[2] for i in range(4)] == expected
    assert [present[2 * i + 1].shape[2] for i in range(4)] == expected


def test_prefill_shares_the_decoder_weights(case):
    _, out, spec, _, _ = case
    assert not (out / (Files.PREFILL + ".data")).exists()
    model = onnx.load(str(out / Files.PREFILL), load_external_data=False)
    big = [t for t in model.graph.initializer if int(np.prod(t.dims)) * 4 > 4096]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    assert {e.value for t in big for e in t.external_data if e.key == "location"} == {"decoder.onnx.data"}
    weights = spec[Keys.LLM_PREFILL_WEIGHTS]
    assert weights["shared_bytes"] >= 0.95 * (out / "decoder.onnx.data").stat().st_size
    assert weights["inline_bytes"] < 64 * 1024
    # under the decoder's own names, so a runtime can give both sessions one copy
    decoder_names = {t.name for t in onnx.load(str(out / Files.DECODER), load_external_data=False).graph.initializer}
    assert {t.name for t in big} <= decoder_names
    assert {name for name, *_ in weights["tensors"]} == {t.name for t in model.graph.initializer
                                                        if t.data_location == onnx.TensorProto.EXTERNAL}


def test_plain_attention_graphs_pass_the_tensorrt_lint(case):
    _, out, spec, _, _ = case
    if spec[Keys.LLM_ATTENTION] != "plain":
        pytest.skip("the fused kernel is an ORT contrib op, never linted for TensorRT")
    for graph in (Files.PREFILL, Files.DECODER):
        assert lint(onnx.load(str(out / graph), load_external_data=False)) == [], graph


@pytest.mark.parametrize("preset, precision", [("tiny-llava", "fp32"), ("tiny-qwen2-vl", "fp32"),
                                               ("tiny-llava", "int4"), ("tiny-qwen2-vl", "int8")])
def test_identity_stage_graph_gives_the_unpruned_graph(adapters, images, preset, precision, tmp_path):
    """K2 = K: prefill.onnx (the stage hook, its gathers and the staged layers) gives, row by row, the logits and
    the present K/V of export/llm.py's unpruned decoder.onnx in the same fused kernels (1D RoPE and M-RoPE), also
    when both are quantized (the same MatMulNBits weights in both graphs)."""
    adapter = adapters[preset]
    inputs = prefill_inputs(adapter, None, images, PROMPTS)
    k = adapter.num_image_tokens
    runner = StageRunner(build("fastv", keep=[k], layer=[2]), num_image=k, num_layers=4,
                         image_start=len(inputs.prefix), kv_policy="uniform", grid=tuple(adapter.grid))
    staged = export_llm(adapter.llm, tmp_path / "staged", validate=False, rope=adapter.rope, stages=runner,
                        precision=precision)
    unpruned = export_llm(adapter.llm, tmp_path / "unpruned", validate=False, rope=adapter.rope, precision=precision)
    embeds, pos, mask = inputs.embeds.numpy(), np.asarray(inputs.position_ids), inputs.attention_mask.numpy()
    logits, present, keeps = OrtLLM(tmp_path / "staged", staged, providers=["cpu"], stages=runner.plan()).prefill(
        embeds, pos, mask, inputs.image_positions.numpy())
    np.testing.assert_array_equal(keeps[0], np.arange(k)[None].repeat(2, axis=0))
    base = OrtLLM(tmp_path / "unpruned", unpruned, providers=["cpu"])
    lengths = mask.sum(axis=1)
    assert lengths[0] != lengths[1]   # the second row is right-padded
    # MatMulNBits' int8 activations (accuracy level 4) round per call shape: measured 0.012 / 0.019 (int8 logits /
    # K-V), while float32 weights move the logits by 0.14 (int8) to 0.9 (int4): 0.03 still tells the weights apart
    atol = (1e-4, 1e-5) if precision == "fp32" else (0.03, 0.03)
    for b, n in enumerate(lengths):
        ref_logits, ref_present = base.step(embeds[b:b + 1, :n], pos[..., b:b + 1, :n], mask[b:b + 1, :n], None)
        np.testing.assert_allclose(logits[b], ref_logits[0], atol=atol[0], rtol=0)
        for ours, theirs in zip(present, ref_present, strict=True):
            np.testing.assert_allclose(ours[b:b + 1, :, :n], theirs, atol=atol[1], rtol=0)


def test_quantized_stage_graphs_share_one_quantized_weights_file(adapters, tmp_path):
    """int4 with an in-LLM stage: decoder.onnx and prefill.onnx are both quantized, prefill.onnx points at the
    decoder's MatMulNBits tensors (no second weights file, nothing large inline), the manifest records the
    quantization, and the validation (kept-slot overlap with the float32 reference, relative logit error) passes."""
    adapter = adapters["tiny-llava"]
    inputs = prefill_inputs(adapter, None, [data.astronaut()], PROMPTS[:1])
    runner = StageRunner(build("dart", keep=[24], layer=[2]), num_image=adapter.num_image_tokens, num_layers=4,
                         image_start=len(inputs.prefix), kv_policy="faithful", grid=tuple(adapter.grid))
    spec = export_llm(adapter.llm, tmp_path, precision="int4", rope=adapter.rope, stages=runner)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.onnx", "decoder.onnx.data", "embed.bin",
                                                          "prefill.onnx"]
    for graph in (Files.PREFILL, Files.DECODER):
        model = onnx.load(str(tmp_path / graph), load_external_data=False)
        # per layer qkv, o, gate, up, down; and the LM head (8-bit)
        assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 4 * 5 + 1, graph
    assert spec[Keys.LLM_PREFILL_WEIGHTS]["inline_bytes"] < 64 * 1024
    assert spec[Keys.LLM_QUANTIZATION]["bits"] == 4
    check = spec[Keys.VALIDATION_LLM]["prefill_stage"]
    assert check["metric"] == "relative_rms" and check[PASSED] and min(check["keep_overlap"]) >= check["min_overlap"]


# -- whole bundles: vision graph + prefill + decoder through the runtime pipeline -----------------------------
BUNDLES = [("tiny-llava", "dart", [24], [2], "faithful", "divprune", 200),
           ("tiny-qwen2-vl", "polymorphic", [30, 20, 12], [1, 2, 3], "uniform", None, None)]


@pytest.fixture(scope="module", params=BUNDLES, ids=lambda c: f"{c[0]}-{c[1]}")
def bundle(request, adapters, tmp_path_factory):
    preset, method, keep, layer, policy, pre, pre_keep = request.param
    adapter = adapters[preset]
    out = tmp_path_factory.mktemp("inllm-bundle") / "bundle"
    manifest = export_bundle(adapter, out, method=pre or "uniform", keep=pre_keep, llm_method=method, llm_keep=keep,
                             llm_layer=layer, kv_policy=policy)
    pruner = adapter.build_pruner(pre, pre_keep) if pre else None
    return adapter, out, manifest, build(method, keep=keep, layer=layer), policy, pruner


def test_pipeline_tokens_and_slots_equal_the_reference(bundle, images):
    adapter, out, m, stage, policy, pruner = bundle
    got = Pipeline(out).generate_rows(images, PROMPTS, max_new_tokens=8)
    ref = generate(adapter, pruner, images, PROMPTS, max_new_tokens=8, llm_stage=stage, kv_policy=policy)
    assert got.ids == ref.ids
    # one copy of the LLM weights for both graphs (runtime/llm.py share_weights): the same answers
    assert Pipeline(out, share_weights=True).generate_rows(images, PROMPTS, max_new_tokens=8).ids == ref.ids
    for ours, theirs in zip(got.stage_keep, ref.stage_keep, strict=True):
        np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(got.kept_positions, np.take_along_axis(got.positions, got.stage_keep[-1], axis=1))
    assert m[Keys.VALIDATION_LLM]["prefill_stage"][PASSED]


def test_manifest_records_each_stage_and_the_layer_average(bundle):
    adapter, _, m, stage, policy, pruner = bundle
    k = pruner.keep if pruner else adapter.num_image_tokens
    stages = stage.bind(k, 4)
    assert m[Keys.LLM_STAGE_METHOD] == stage.name and m[Keys.LLM_STAGE_KV_POLICY] == policy
    assert m[Keys.LLM_STAGE_STAGES] == [{"layer": s.layer, "keep_in": s.num_in, "keep_out": s.num_out}
                                        for s in stages]
    bounds = [s.layer for s in stages] + [4]
    expected = (bounds[0] * k + sum((bounds[i + 1] - bounds[i]) * s.num_out for i, s in enumerate(stages))) / 4
    assert m[Keys.LLM_STAGE_LAYER_AVERAGE] == pytest.approx(expected)


def test_profile_reports_kv_per_layer_group_and_the_predicted_flop_ratio(bundle):
    from edgeprune.profiles.profiler import profile_bundle
    from edgeprune.profiles.report import profile_markdown

    _, out, m, stage, policy, _ = bundle
    report = profile_bundle(out, runs=1, warmup=0, new_tokens=3, batch=2)
    mem = report["memory"]
    assert mem["kv_cache_bytes"] == mem["kv_cache_bytes_expected"]     # the policy's prediction, to the byte
    starts = [0] if policy == "uniform" else [0, *stage.layer]
    assert [g["layers"] for g in mem["kv_cache_groups"]] == [[a, b] for a, b in zip(starts, [*starts[1:], 4])]
    info = report["llm_stage"]
    assert info["method"] == stage.name and info["layer_average"] == m[Keys.LLM_STAGE_LAYER_AVERAGE]
    assert 0.0 < info["prefill_flop_ratio_predicted"] < 1.0
    assert "predicted prefill cost" in profile_markdown(report)


def test_runtime_refuses_rows_the_stage_cannot_take(bundle, images):
    _, out, m, _, _, _ = bundle
    pipe = Pipeline(out)
    plan = pipe.stages
    pipe.stages = type(plan)(**{**plan.__dict__, "min_text_tokens": 100})   # a very demanding method
    with pytest.raises(EdgepruneError, match=rf"{plan.method}: row\(s\) \[0\] have \[\d+\] text token\(s\) after "
                                             r"the image, expected >= 100"):
        pipe(images[:1], PROMPTS[0], max_new_tokens=1)
    pipe.stages = type(plan)(**{**plan.__dict__, "image_start": plan.image_start + 1})
    with pytest.raises(EdgepruneError, match=rf"the prompt puts the image after {plan.image_start} tokens; this "
                                             rf"bundle's in-LLM stage was exported for {plan.image_start + 1}"):
        pipe(images[:1], PROMPTS[0], max_new_tokens=1)


def test_budget_errors_before_any_export(adapters, tmp_path):
    adapter = adapters["tiny-llava"]
    with pytest.raises(EdgepruneError, match=r"fastv: stage 1 L=1, K=64 -> K2=65, T=4: expected K2 <= K"):
        export_bundle(adapter, tmp_path / "b", method="uniform", keep=64, llm_method="fastv", llm_keep=[65],
                      llm_layer=[1])
    with pytest.raises(EdgepruneError, match=r"L=4, K=576 -> K2=64, T=4: expected 1 <= L <= T-1 = 3"):
        export_bundle(adapter, tmp_path / "b", method="uniform", llm_method="dart", llm_keep=[64], llm_layer=[4])
    with pytest.raises(EdgepruneError, match="unknown in-LLM method 'dartt'"):
        export_bundle(adapter, tmp_path / "b", method="uniform", llm_method="dartt", llm_keep=[64])
    assert not (tmp_path / "b").exists()


def test_deepstack_llm_refuses_an_in_llm_stage(tmp_path):
    """Qwen3-VL adds image features to the residual after its first layers; a stage would have to gather them
    with the kept tokens, which neither graph does: a clear error before anything is written."""
    from edgeprune.errors import ModelError

    adapter = models.load("tiny-qwen3-vl")
    runner = StageRunner(build("fastv", keep=[8], layer=[1]), num_image=adapter.num_image_tokens, num_layers=2,
                         image_start=3, kv_policy="uniform", grid=tuple(adapter.grid))
    with pytest.raises(ModelError, match=r"an in-LLM stage on a DeepStack LLM \(\d+ layers take image features"):
        export_llm(adapter.llm, tmp_path, validate=False, rope=adapter.rope, stages=runner)
    assert list(tmp_path.iterdir()) == []
