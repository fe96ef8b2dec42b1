"""Profiler and planner on bundles of the tiny preset (exported once per module, no validation)."""
from __future__ import annotations

import json

import pytest

from edgeprune.errors import BundleError
from edgeprune.profiles.device import load_device_profile
from edgeprune.profiles.planner import LatencyModel, ModelFacts, plan, predict_memory
from edgeprune.profiles.profiler import kv_bytes_expected, profile_bundle, soak
from edgeprune.runtime.format import Files, Keys


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    from edgeprune.export.bundle import export_bundle
    from edgeprune.models import load

    adapter = load("tiny-llava")
    root = tmp_path_factory.mktemp("profile-bundles")
    export_bundle(adapter, root / "k64", method="attention", keep=64, validate=False)
    export_bundle(adapter, root / "full", method="attention", keep=None, validate=False,
                  reuse_llm_from=root / "k64")
    return {"k64": root / "k64", "full": root / "full"}


@pytest.mark.parametrize("name,keep", [("k64", 64), ("full", 576)])
def test_profile_report_is_consistent(bundles, name, keep):
    report = profile_bundle(bundles[name], runs=3, warmup=1, new_tokens=4, threads=1,
                            device=load_device_profile("cpu-generic"))
    assert report["keep"] == keep and report["num_image_tokens"] == 576
    lat = report["latency_s"]
    for stage in ("preprocess", "vision", "embed", "prefill", "decode", "ttft", "decode_per_token", "total"):
        s = lat[stage]
        assert s["n"] >= 1 and 0 <= s["min"] <= s["median"] <= s["p90"] <= s["max"], stage
    # the stages account for the whole request, up to tokenizer decoding and Python overhead
    assert lat["stages_sum"]["median"] <= lat["total"]["median"]
    assert lat["total"]["median"] - lat["stages_sum"]["median"] <= max(0.25 * lat["total"]["median"], 0.02)
    ttft_parts = sum(lat[s]["median"] for s in ("preprocess", "vision", "embed", "prefill"))
    assert lat["ttft"]["min"] <= ttft_parts * 1.5
    # KV bytes = layers x 2 x kv_heads x head_dim x tokens x dtype size, tokens = prompt + fed-back new tokens
    mem, tokens = report["memory"], report["tokens"]
    assert tokens["prompt"] == keep + tokens["text_tokens"]
    assert mem["kv_cache_tokens"] == tokens["prompt"] + tokens["generated"] - 1
    m = json.loads((bundles[name] / Files.MANIFEST).read_text())
    assert mem["kv_cache_bytes"] == mem["kv_cache_bytes_expected"] == (
        m[Keys.LLM_NUM_LAYERS] * 2 * m[Keys.LLM_NUM_KV_HEADS] * m[Keys.LLM_HEAD_DIM] * mem["kv_cache_tokens"] * 4)
    assert set(mem["weights_bytes"]) == {"vision", "llm"}
    assert mem["peak_rss_bytes"] > 0
    for probe in mem["device"].values():      # this machine has neither NVML nor tegrastats: reported, not raised
        assert probe["available"] or probe["reason"]
    json.dumps(report, allow_nan=False)       # machine-readable as is
    assert all(len(v) == 3 for v in report["samples_s"].values())      # one value per round, for paired ratios
    assert lat["ttft"]["spread_pct"] == pytest.approx(
        100 * (lat["ttft"]["max"] - lat["ttft"]["min"]) / lat["ttft"]["median"])
    pruner = report["pruner"]                 # the ORT node profile of the vision graph
    if keep < 576:
        assert pruner["available"] and pruner["nodes"] > 0 and pruner["runs"] == 3
        assert 0 < pruner["share"]["min"] <= pruner["share"]["median"] <= pruner["share"]["max"] < 1
        assert 0 < pruner["time_s"]["median"] < lat["vision"]["median"]


def test_interleaved_bundles_share_one_llm_and_compare_round_by_round(bundles):
    from edgeprune.profiles.profiler import _load, compare, profile_bundles

    pipelines = _load([bundles["k64"], bundles["full"]], None, 1)
    assert pipelines[0].llm is pipelines[1].llm                          # the same LLM graphs: loaded once
    k64, full = profile_bundles([bundles["k64"], bundles["full"]], runs=2, warmup=1, new_tokens=2, threads=1)
    assert (k64["keep"], full["keep"]) == (64, 576) and k64["settings"]["interleaved_with"] == 1
    assert "2 bundles loaded" in k64["memory"]["peak_rss_scope"]
    ratios = compare(k64, full)
    assert set(ratios) == {"vision", "prefill", "ttft", "total"}
    for stage, r in ratios.items():
        per_round = [a / b for a, b in zip(full["samples_s"][stage], k64["samples_s"][stage])]
        assert r["min"] == pytest.approx(min(per_round)) and r["max"] == pytest.approx(max(per_round)), stage


def test_kv_formula():
    spec = {Keys.LLM_NUM_LAYERS: 30, Keys.LLM_NUM_KV_HEADS: 3, Keys.LLM_HEAD_DIM: 64, Keys.LLM_DTYPE: "float16"}
    assert kv_bytes_expected(spec, batch=2, tokens=100) == 30 * 2 * 3 * 64 * 100 * 2 * 2


def test_soak_reports_growth_and_drift(bundles):
    result = soak(bundles["k64"], 6, new_tokens=2, threads=1)
    assert result["requests"] == 6
    assert result["rss_final_bytes"] > 0 and abs(result["rss_growth_pct"]) < 50
    assert result["latency_first_tenth_s"] > 0


def test_cli_profile_writes_report_and_refuses_overwrite(bundles, tmp_path, capsys):
    from edgeprune.cli import main

    out = tmp_path / "rep"
    args = ["profile", str(bundles["k64"]), "--runs", "2", "--new-tokens", "2", "--threads", "1", "--out", str(out),
            "--reference", str(bundles["full"])]
    assert main(args) == 0
    report = json.loads((out / "profile.json").read_text())
    assert report["pruner"]["available"] and report["settings"]["interleaved_with"] == 1
    assert set(report["reference"]["comparison"]) == {"vision", "prefill", "ttft", "total"}
    text = (out / "profile.md").read_text()
    assert "| time to first token |" in text and "interleaved round-robin with 1 other bundle" in text
    assert "pruner (ONNX Runtime node profile" in text and "| prefill |" in text
    assert main(args) == 1
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0
    # a pruned bundle is no reference: refused before any timing
    assert main(["profile", str(bundles["k64"]), "--reference", str(bundles["k64"])]) == 1
    assert "expected an unpruned bundle (K = N = 576), got K=64" in capsys.readouterr().err


FACTS = ModelFacts(name="toy", num_image_tokens=576, vision_params=300_000_000, llm_params=7_000_000_000,
                   num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, hidden_size=4096,
                   intermediate_size=11008, vocab_size=32000, vision_hidden=1024, vision_layers=24, vision_tokens=577)


def test_memory_prediction_kv_is_exact_and_grows_with_keep():
    small, large = predict_memory(FACTS, 64, 128, "fp16"), predict_memory(FACTS, 576, 128, "fp16")
    assert small["kv_cache"] == 32 * 2 * 32 * 128 * (64 + 128) * 2
    assert small["weights"] == large["weights"] == 7_300_000_000 * 2
    assert small["total"] < large["total"]


def test_plan_counts_a_quantized_llm_as_stored_not_in_the_device_precision(bundles, tmp_path):
    """An int4 LLM keeps its packed size on every device: the plan's weights are the vision graph's parameters in
    the device precision plus the LLM graph files' bytes, and a float bundle's LLM is counted in the device's."""
    from edgeprune.export.bundle import export_bundle
    from edgeprune.models import load
    from edgeprune.profiles.planner import facts_from_bundle

    export_bundle(load("tiny-llava"), tmp_path / "int4", method="attention", keep=64, validate=False,
                  llm_precision="int4")
    device = load_device_profile("jetson-orin-nano-8gb")            # fp16
    fp32, int4 = facts_from_bundle(bundles["k64"]), facts_from_bundle(tmp_path / "int4")
    assert fp32.llm_weight_bits is None and fp32.llm_params == int4.llm_params
    stored = sum(f.stat().st_size for f in (tmp_path / "int4").glob("decoder.onnx*"))
    assert int4.llm_weight_bits == pytest.approx(8 * stored / int4.llm_params) and int4.llm_weight_bits < 16
    weights = {name: plan(f, device, context=16)["rows"][0]["memory"]["weights"] for name, f in
               (("fp32", fp32), ("int4", int4))}
    assert weights["fp32"] == (fp32.vision_params + fp32.llm_params) * 2
    assert weights["int4"] == int(int4.vision_params * 2 + stored)
    assert any("int4, as the bundle stores them" in n for n in plan(int4, device, context=16)["notes"])
    (tmp_path / "int4" / "decoder.onnx").unlink()                   # a damaged bundle: one line naming the file
    with pytest.raises(BundleError, match=r"decoder.onnx: missing \(listed in manifest.json\)"):
        facts_from_bundle(tmp_path / "int4")


def test_plan_picks_largest_keep_meeting_memory_and_ttft(tmp_path):
    device = load_device_profile("jetson-agx-orin-64gb")
    latency = {"dart": LatencyModel([576, 64], [0.9, 0.2], "test"),
               "divprune": LatencyModel([576, 64], [1.0, 0.25], "test")}
    result = plan(FACTS, device, context=128, ttft_ms=400, latency=latency)
    rec = result["recommendation"]
    # TTFT is linear between the measured points: dart meets 400 ms up to K = 64 + (576-64) * 0.2/0.7 = 210
    assert rec == {"keep": 192, "method": "dart"}
    row = next(r for r in result["rows"] if r["keep"] == 192)
    assert row["ttft_source"]["dart"] == "estimated (interpolated)"
    assert next(r for r in result["rows"] if r["keep"] == 64)["ttft_source"]["dart"] == "measured"


def test_plan_says_when_nothing_fits():
    result = plan(FACTS, load_device_profile("jetson-orin-nano-8gb"), context=128)   # 14.6 GB of fp16 weights
    assert result["recommendation"] is None
    assert not any(r["fits_memory"] for r in result["rows"])
