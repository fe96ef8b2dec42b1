"""The device path (runtime/vision.py, runtime/trt.py, runtime/providers.py, build-engine's manifest record):
engines checked against the device before use, providers resolved once, the GPU precision rule for the fused
LLM. Pure Python here (no GPU, no TensorRT); the runner itself is tested where `tensorrt` imports."""
from __future__ import annotations

import json
import logging
import shutil
import sys
import types

import numpy as np
import pytest

from edgeprune.errors import BundleError, EdgepruneError
from edgeprune.export.engine import record_engine
from edgeprune.runtime import trt as trt_mod
from edgeprune.runtime.bundle import load_bundle
from edgeprune.runtime.format import Engine, Files, Keys
from edgeprune.runtime.llm import check_gpu_precision, warn_cpu_fallback
from edgeprune.runtime.providers import requested_providers, resolve_providers
from edgeprune.runtime.trt import DeviceFacts, check_engine

ORIN = DeviceFacts("10.3.0", "Orin", "8.7")
RTX = DeviceFacts("10.7.0", "NVIDIA GeForce RTX 4090", "8.9")
CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


def _entry(facts: DeviceFacts, **changes) -> dict:
    entry = {Engine.FILE: Files.VISION_ENGINE, Engine.TIMING_CACHE: Files.TIMING_CACHE,
             Engine.TENSORRT_VERSION: facts.tensorrt_version, Engine.GPU_NAME: facts.gpu_name,
             Engine.COMPUTE_CAPABILITY: facts.compute_capability, Engine.PRECISION: "fp16",
             Engine.BATCH: {"min": 1, "opt": 1, "max": 4}, Engine.BUILT: "2026-01-01T00:00:00+00:00"}
    return {**entry, **changes}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from edgeprune.export.bundle import export_bundle
    from edgeprune.models import load

    out = tmp_path_factory.mktemp("device") / "bundle"
    export_bundle(load("tiny-llava"), out, method="attention", keep=8, validate=False)
    return out


@pytest.fixture
def with_engine(exported, tmp_path):
    """A copy of the bundle with an engine recorded the way build-engine records one (built for an Orin)."""
    out = tmp_path / "bundle"
    shutil.copytree(exported, out)
    (out / Files.ENGINES).mkdir()
    (out / Files.VISION_ENGINE).write_bytes(b"plan bytes")
    (out / Files.TIMING_CACHE).write_bytes(b"cache bytes")
    record_engine(out, load_bundle(out).manifest, _entry(ORIN), written=[Files.VISION_ENGINE, Files.TIMING_CACHE,
                                                                         Files.INT8_CACHE])
    return out


# -- engines are checked before use -----------------------------------------------------------------------
def test_engine_for_another_tensorrt_and_gpu_names_both_sides_and_the_rebuild(tmp_path):
    check_engine(_entry(ORIN), ORIN, tmp_path)                       # the device it was built on: accepted
    with pytest.raises(BundleError) as err:
        check_engine(_entry(ORIN), RTX, tmp_path)
    message = str(err.value)
    assert "engines/vision.plan: built with TensorRT 10.3.0 for Orin (compute 8.7)" in message
    assert "this device has TensorRT 10.7.0 and NVIDIA GeForce RTX 4090 (compute 8.9)" in message
    assert f"edgeprune build-engine {tmp_path} --force" in message
    same_gpu_other_trt = DeviceFacts("10.4.0", "Orin", "8.7")
    with pytest.raises(BundleError, match=r"TensorRT 10.3.0 .* this device has TensorRT 10.4.0 and Orin"):
        check_engine(_entry(ORIN), same_gpu_other_trt, tmp_path)
    with pytest.raises(BundleError, match=r"precision 'fp8', expected one of fp32, fp16, int8"):
        check_engine(_entry(ORIN, **{Engine.PRECISION: "fp8"}), ORIN, tmp_path)


def test_engine_recorded_by_an_older_edgeprune_asks_for_a_rebuild(tmp_path):
    old = {Engine.FILE: Files.VISION_ENGINE, Engine.TENSORRT_VERSION: "8.5.2", Engine.PRECISION: "fp16",
           Engine.BATCH: {"min": 1, "opt": 1, "max": 4}}              # schema 1: no GPU facts
    with pytest.raises(BundleError, match=r"lacks gpu_name, compute_capability .* --force"):
        check_engine(old, ORIN, tmp_path)


def test_record_engine_hashes_only_what_build_engine_wrote(with_engine):
    manifest = load_bundle(with_engine).manifest                     # the engine and its cache verify
    assert manifest[Keys.ENGINE_VISION] == _entry(ORIN)
    assert {Files.VISION_ENGINE, Files.TIMING_CACHE} <= set(manifest[Keys.FILES_SHA256])
    assert Files.INT8_CACHE not in manifest[Keys.FILES_SHA256]        # not written: not listed
    # a graph tampered with before the engine was recorded is still caught (no blanket re-hash)
    manifest = json.loads((with_engine / Files.MANIFEST).read_text())
    with open(with_engine / Files.VISION, "ab") as f:
        f.write(b"\0")
    record_engine(with_engine, manifest, _entry(ORIN), written=[Files.VISION_ENGINE])
    with pytest.raises(BundleError, match=r"vision\.onnx: sha256 .* does not match"):
        load_bundle(with_engine)


def test_tampered_or_missing_engine_is_a_bundle_error(with_engine):
    with open(with_engine / Files.VISION_ENGINE, "ab") as f:
        f.write(b"x")
    with pytest.raises(BundleError, match=r"engines/vision\.plan: sha256 .* does not match"):
        load_bundle(with_engine)
    (with_engine / Files.VISION_ENGINE).unlink()
    with pytest.raises(BundleError, match=r"engines/vision\.plan: missing \(listed in manifest\.json\)"):
        load_bundle(with_engine)


def test_pipeline_refuses_an_engine_built_for_another_device(with_engine, monkeypatch):
    """--provider tensorrt with TensorRT importable: the engine is checked against this device before it
    is deserialized (TensorRT itself stubbed: no GPU here)."""
    from edgeprune.runtime.pipeline import Pipeline

    monkeypatch.setattr(trt_mod, "import_tensorrt", lambda: types.SimpleNamespace(__version__=RTX.tensorrt_version))
    monkeypatch.setattr(trt_mod, "device_facts", lambda device=0: RTX)
    monkeypatch.setitem(sys.modules, "polygraphy.cuda", types.ModuleType("polygraphy.cuda"))
    with pytest.raises(BundleError, match=rf"built with TensorRT 10.3.0 for Orin .* build-engine {with_engine} --force"):
        Pipeline(with_engine, providers=["tensorrt"])
    Pipeline(with_engine, providers=["cpu"], threads=1)               # not asked for: the ONNX graph runs


def test_without_tensorrt_the_vision_graph_falls_back_with_a_warning(with_engine, monkeypatch, caplog):
    from edgeprune.runtime.pipeline import Pipeline
    from edgeprune.runtime.vision import OrtVision

    monkeypatch.setitem(sys.modules, "tensorrt", None)                # import tensorrt -> ImportError
    image = np.zeros((336, 336, 3), np.uint8)
    with caplog.at_level(logging.WARNING):
        pipe = Pipeline(with_engine, providers=["tensorrt"], threads=1)
    assert isinstance(pipe.vision, OrtVision)
    assert "runs on ONNX Runtime instead of the bundle's TensorRT engine" in caplog.text
    assert pipe(image, "hi", max_new_tokens=3).ids == Pipeline(with_engine, threads=1)(image, "hi", max_new_tokens=3).ids


# -- providers, once ------------------------------------------------------------------------------------------
def test_providers_are_resolved_once_for_every_graph(with_engine, monkeypatch):
    import onnxruntime as ort

    from edgeprune.runtime.pipeline import Pipeline

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    pipe = Pipeline(with_engine, providers=["tensorrt", "cpu"], threads=1)
    assert pipe.llm.providers == pipe.providers == resolve_providers(pipe.providers)    # idempotent, shared
    # where the build has them: TensorRT brings CUDA after it and caches in engines/ort-tensorrt
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    resolved = resolve_providers(["tensorrt"], cache_dir=with_engine / Files.ORT_TRT_CACHE)
    assert [p if isinstance(p, str) else p[0] for p in resolved] == [TRT, CUDA, CPU]
    assert resolved[0][1]["trt_engine_cache_path"] == str(with_engine / Files.ORT_TRT_CACHE)
    assert resolve_providers(resolved) == resolved
    (with_engine / Files.ORT_TRT_CACHE / "TensorrtExecutionProvider_cache.engine").write_bytes(b"runtime cache")
    load_bundle(with_engine)                                          # ORT's own cache is never hashed
    with pytest.raises(EdgepruneError, match=r"unknown provider 'rocm'; expected one of cpu, cuda, tensorrt"):
        requested_providers(["rocm"])


# -- the GPU precision rule of the fused LLM ----------------------------------------------------------------------
def test_fp32_fused_llm_on_a_gpu_names_the_export_to_use():
    """ONNX Runtime's CUDA GroupQueryAttention has float16/bfloat16 kernels only."""
    with pytest.raises(EdgepruneError, match=r"float32 with fused attention .* on CUDAExecutionProvider .* "
                                             r"`edgeprune export \.\.\. --llm-precision fp16` \(int8/int4 .*"
                                             r"`--attention plain`"):
        check_gpu_precision([CUDA, CPU], "fused", "float32")
    with pytest.raises(EdgepruneError, match="on TensorrtExecutionProvider, CUDAExecutionProvider"):
        check_gpu_precision([(TRT, {}), CUDA, CPU], "fused", "float32")
    check_gpu_precision([CUDA, CPU], "fused", "float16")
    check_gpu_precision([CUDA, CPU], "plain", "float32")
    check_gpu_precision([CPU], "fused", "float32")


def test_ort_llm_refuses_before_loading_and_warns_on_a_silent_cpu_fallback(exported, monkeypatch, caplog):
    import onnxruntime as ort

    from edgeprune.runtime.llm import OrtLLM

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    with pytest.raises(EdgepruneError, match="--llm-precision fp16"):
        OrtLLM(exported, load_bundle(exported).manifest, providers=["cuda"])
    with caplog.at_level(logging.WARNING):
        warn_cpu_fallback([CUDA, CPU], [CPU])
    assert "was to run on CUDAExecutionProvider but ONNX Runtime put it on the CPU" in caplog.text


# -- the runner itself: only where TensorRT and a GPU exist -----------------------------------------------------
def test_tensorrt_runner_matches_onnx_runtime(exported, tmp_path):
    pytest.importorskip("tensorrt")
    from edgeprune.export.engine import build_engine
    from edgeprune.runtime.pipeline import Pipeline
    from edgeprune.runtime.trt import TrtVision

    out = tmp_path / "trt"
    shutil.copytree(exported, out)
    build_engine(out, max_batch=2)
    image = np.random.default_rng(0).integers(0, 255, (336, 336, 3), dtype=np.uint8)
    pipe = Pipeline(out, providers=["tensorrt"], threads=1)
    assert isinstance(pipe.vision, TrtVision)
    ref = Pipeline(out, providers=["cpu"], threads=1)
    got, want = pipe([image, image], "hi", max_new_tokens=3), ref([image, image], "hi", max_new_tokens=3)
    np.testing.assert_array_equal(got.positions, want.positions)     # fp32 engine: the same selection
    with pytest.raises(EdgepruneError, match="--force"):
        build_engine(out)


def test_session_options_spin_only_when_asked_not_to():
    from edgeprune.runtime.providers import session_options

    key = "session.intra_op.allow_spinning"
    assert session_options(2, spin=False).get_session_config_entry(key) == "0"
    with pytest.raises(RuntimeError):   # not set: ONNX Runtime's default (spinning) applies
        session_options(2).get_session_config_entry(key)
    assert session_options(3, spin=False).intra_op_num_threads == 3
