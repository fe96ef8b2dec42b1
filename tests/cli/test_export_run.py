"""`edgeprune export / run / inspect / build-engine` through cli.main([...]) on the tiny preset."""
from __future__ import annotations

import json
import sys

import pytest

from edgeprune.cli import main
from edgeprune.runtime.format import PASSED, Files, Keys


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from PIL import Image

    from edgeprune.export.validate import seeded_images

    path = tmp_path_factory.mktemp("img") / "image.png"
    Image.fromarray(seeded_images((336, 336), 1, seed=9)[0]).save(path)
    return path


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """One CLI export, shared (exports cost seconds)."""
    out = tmp_path_factory.mktemp("cli") / "bundle"
    code = main(["export", "--model", "tiny-llava", "--method", "dart", "--keep", "16", "--out", str(out),
                 "--positions", "original", "--cfg", "pivots=4", "-q"])
    assert code == 0
    return out


def test_export_writes_bundle_and_reports_parity(bundle, capsys):
    m = json.loads((bundle / Files.MANIFEST).read_text())
    assert m[Keys.PRUNER_METHOD] == "dart" and m[Keys.PRUNER_KEEP] == 16
    assert m[Keys.POSITIONS_MODE] == "original" and m[Keys.PRUNER_CONFIG] == {"pivots": 4}
    assert m[Keys.VALIDATION_VISION][PASSED]


def test_export_prints_summary(tmp_path, capsys):
    code = main(["export", "--model", "tiny-llava", "--method", "attention", "--keep", "8", "--out",
                 str(tmp_path / "b"), "-q"])
    out = capsys.readouterr().out
    assert code == 0
    assert "method attention, K=8 of N=576, compact positions" in out
    assert "parity (ONNX Runtime vs torch, seeded inputs):" in out
    assert "vision: 2 images, positions identical" in out and "OK" in out
    # an existing bundle: refused without --force (before loading the model), replaced with it
    assert main(["export", "--model", "tiny-llava", "--method", "attention", "--keep", "4", "--out",
                 str(tmp_path / "b"), "-q"]) == 1
    assert "a bundle already exists there; pass --force" in capsys.readouterr().err
    assert main(["export", "--model", "tiny-llava", "--method", "attention", "--keep", "4", "--out",
                 str(tmp_path / "b"), "--force", "--no-validate", "-q"]) == 0
    assert json.loads((tmp_path / "b" / Files.MANIFEST).read_text())[Keys.PRUNER_KEEP] == 4
    assert "parity: not validated" in capsys.readouterr().out


def test_scorer_maps_to_the_scorer_option(tmp_path, monkeypatch, capsys):
    assert main(["export", "--model", "tiny-llava", "--method", "dart", "--keep", "8", "--scorer", "s.safetensors",
                 "--out", str(tmp_path / "x"), "-q"]) == 1
    assert "--scorer: method 'dart' takes no scorer option" in capsys.readouterr().err
    seen = {}

    def fake_export(adapter, out, **kw):
        seen.update(kw, llm_dtype=next(adapter.llm.parameters()).dtype)
        raise SystemExit(0)

    monkeypatch.setattr("edgeprune.export.bundle.export_bundle", fake_export)
    with pytest.raises(SystemExit):
        main(["export", "--model", "tiny-llava", "--method", "autoselect", "--keep", "8", "--scorer",
              "s.safetensors", "--out", str(tmp_path / "y"), "--fp16", "--batch", "2", "-q"])
    assert seen["cfg"] == {"scorer": "s.safetensors"} and seen["method"] == "autoselect"
    assert seen["llm_precision"] == "fp16" and seen["batch"] == 2 and seen["keep"] == 8   # --fp16: an alias
    assert str(seen["llm_dtype"]) == "torch.float16"              # --fp16 loads the model in float16


def test_autoselect_needs_a_scorer_and_the_random_one_is_labelled(tmp_path, capsys):
    """tiny-llava ships no scorer: --method autoselect alone is refused (naming --scorer and `edgeprune
    train`); --cfg scorer=random is the explicit untrained baseline, recorded and shown as such."""
    from edgeprune.runtime.bundle import pruner_label

    out = tmp_path / "auto"
    assert main(["export", "--model", "tiny-llava", "--method", "autoselect", "--keep", "8", "--out", str(out),
                 "--no-validate", "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert "--scorer CKPT" in err and "`edgeprune train`" in err and "--cfg scorer=random" in err
    assert len(err.splitlines()) == 1 and not out.exists()
    assert main(["export", "--model", "tiny-llava", "--method", "autoselect", "--keep", "8", "--out", str(out),
                 "--cfg", "scorer=random", "--no-validate", "-q"]) == 0
    m = json.loads((out / Files.MANIFEST).read_text())
    assert m[Keys.PRUNER_SCORER] == {"file": None, "sha256": None, "recipe": "random", "trained": False, "seed": 0}
    assert pruner_label(m) == "autoselect (untrained)"
    capsys.readouterr()
    assert main(["inspect", str(out), "--no-verify"]) == 0
    assert "scorer:    random, untrained (seed 0)" in capsys.readouterr().out


def test_llm_precision_option(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_export(adapter, out, **kw):
        seen.update(kw)
        raise SystemExit(0)

    monkeypatch.setattr("edgeprune.export.bundle.export_bundle", fake_export)
    base = ["export", "--model", "tiny-llava", "--method", "dart", "--keep", "8", "--out", str(tmp_path / "x"), "-q"]
    for option, precision in (([], "fp32"), (["--llm-precision", "int4"], "int4"),
                              (["--llm-precision", "fp16", "--fp16"], "fp16")):
        with pytest.raises(SystemExit):
            main(base + option)
        assert seen["llm_precision"] == precision
    assert main(base + ["--llm-precision", "int4", "--fp16"]) == 1
    assert "--fp16 and --llm-precision int4: choose one" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:                         # argparse: unknown choice
        main(base + ["--llm-precision", "int3"])
    assert exit_info.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err


def test_run_streams_text_and_timing(bundle, image, capsys):
    from edgeprune.runtime.pipeline import Pipeline

    assert main(["run", str(bundle), "--image", str(image), "--prompt", "What is it?", "--max-new-tokens", "8",
                 "--threads", "1"]) == 0
    captured = capsys.readouterr()
    expected = Pipeline(bundle, threads=1)(str(image), "What is it?", max_new_tokens=8).text
    assert captured.out == expected + "\n"
    assert "timing: preprocess" in captured.err and "prefill" in captured.err and "K=16 of N=576" in captured.err


def test_run_batch_and_sampling(bundle, image, capsys):
    args = ["run", str(bundle), "--image", str(image), "--image", str(image), "--prompt", "hi",
            "--max-new-tokens", "6", "--sample", "--top-p", "0.8", "--seed", "5"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.count(f"[{image}]") == 2
    assert main(args) == 0
    assert capsys.readouterr().out == first            # seeded


def test_run_errors_are_one_line(bundle, tmp_path, capsys):
    assert main(["run", str(tmp_path), "--image", "x.png", "--prompt", "hi"]) == 1
    assert "manifest.json: missing" in capsys.readouterr().err
    assert main(["run", str(bundle), "--image", str(tmp_path / "none.png"), "--prompt", "hi"]) == 1
    assert "cannot read image" in capsys.readouterr().err


def test_run_states_the_model_domain_once_on_stderr(bundle, image, tmp_path, capsys):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / Files.MANIFEST).read_text())
    manifest[Keys.MODEL_DOMAIN] = "ten test garments"          # the manifest is not among the hashed files
    (copy / Files.MANIFEST).write_text(json.dumps(manifest))
    args = ["--image", str(image), "--prompt", "hi", "--max-new-tokens", "3", "--threads", "1"]
    assert main(["run", str(copy), *args, "--image", str(image)]) == 0     # a batch of two: still one note
    captured = capsys.readouterr()
    assert captured.err.count("note: this model was trained to recognise ten test garments") == 1
    assert "recognise" not in captured.out
    assert main(["run", str(bundle), *args]) == 0                          # no domain in the manifest: no note
    assert "recognise" not in capsys.readouterr().err


def test_run_device_profile_supplies_the_providers(bundle, image, tmp_path, capsys):
    args = ["run", str(bundle), "--image", str(image), "--prompt", "hi", "--max-new-tokens", "2", "--threads", "1"]
    assert main(args + ["--device-profile", "cpu-generic"]) == 0
    assert "CPUExecutionProvider" in capsys.readouterr().err
    # a Jetson profile asks for TensorRT and CUDA first: absent from this onnxruntime, skipped with a warning
    assert main(args + ["--device-profile", "jetson-orin-nano-8gb"]) == 0
    err = capsys.readouterr().err
    assert "TensorrtExecutionProvider is not in this onnxruntime build" in err and "vision on CPUExecutionProvider" in err
    # --provider wins over the profile's list
    assert main(args + ["--device-profile", "jetson-orin-nano-8gb", "--provider", "cpu"]) == 0
    assert "TensorrtExecutionProvider" not in capsys.readouterr().err
    assert main(args + ["--device-profile", "no-such-device"]) == 1
    assert "unknown device profile 'no-such-device'" in capsys.readouterr().err


def test_inspect(bundle, tmp_path, capsys):
    assert main(["inspect", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "pruner:    dart K=16 (pivots=4)" in out and "positions: original" in out
    assert "precision: fp32\n" in out and "greedy tokens (teacher-forced" in out
    assert "vision:    vision.onnx: pixels [batch, 3, 336, 336] -> image_tokens [batch, 16, 64]" in out
    assert "files: OK" in out
    assert main(["inspect", str(bundle), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[Keys.PRUNER_KEEP] == 16
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    (bad / Files.PREPROCESS).write_text("{}")
    assert main(["inspect", str(bad)]) == 1
    captured = capsys.readouterr()
    assert "files: ERROR" in captured.out and "preprocess.json: sha256" in captured.err


def test_build_engine_without_tensorrt_is_clear(bundle, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)   # import tensorrt -> ImportError, even where installed
    assert main(["build-engine", str(bundle), "--fp16"]) == 1
    err = capsys.readouterr().err
    assert "build-engine needs TensorRT's Python package 'tensorrt'" in err
    assert "Traceback" not in err

    from edgeprune.errors import MissingDependencyError
    from edgeprune.export.engine import build_engine

    with pytest.raises(MissingDependencyError):
        build_engine(bundle)


def test_export_buckets_and_image_size_options(tmp_path, capsys):
    out = tmp_path / "qwen"
    assert main(["export", "--model", "tiny-qwen2-vl", "--method", "dart", "--keep", "16", "--buckets",
                 "168x224,280x280", "--no-validate", "--out", str(out)]) == 0
    manifest = json.loads((out / Files.MANIFEST).read_text())
    buckets = manifest[Keys.VISION_BUCKETS]
    assert [(b["size"], b["num_image_tokens"], b["file"]) for b in buckets] == [
        ([168, 224], 48, "vision.onnx"), ([280, 280], 100, "vision_280x280.onnx")]
    assert main(["export", "--model", "tiny-llava", "--method", "dart", "--keep", "16", "--image-size", "224x224",
                 "--out", str(tmp_path / "llava")]) == 1
    assert "input size is fixed at (336, 336)" in capsys.readouterr().err
    assert main(["export", "--model", "tiny-qwen2-vl", "--method", "dart", "--keep", "16", "--image-size", "224",
                 "--out", str(tmp_path / "bad")]) == 1
    assert "--image-size '224': expected HEIGHTxWIDTH" in capsys.readouterr().err


def test_export_model_directory_families(tmp_path, capsys):
    """`export --model DIR` recognises a new family from config.json (an InternVL directory, at a tile grid chosen
    with --image-size) and names the supported architectures for one it does not know."""
    from transformers import PreTrainedTokenizerFast

    from edgeprune.models.internvl import tiny_internvl_model

    model, tokenizer = tiny_internvl_model()
    model.save_pretrained(tmp_path / "internvl")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(tmp_path / "internvl")
    out = tmp_path / "bundle"
    assert main(["export", "--model", str(tmp_path / "internvl"), "--method", "dart", "--keep", "20", "--image-size",
                 "112x224", "--no-validate", "--out", str(out)]) == 0
    manifest = json.loads((out / Files.MANIFEST).read_text())
    assert manifest[Keys.MODEL_FAMILY] == "internvl" and manifest[Keys.MODEL_NUM_IMAGE_TOKENS] == 3 * 16  # 1x2 + thumb
    (tmp_path / "gemma").mkdir()
    (tmp_path / "gemma" / "config.json").write_text(json.dumps({"model_type": "gemma3",
                                                                "architectures": ["Gemma3ForConditionalGeneration"]}))
    capsys.readouterr()
    assert main(["export", "--model", str(tmp_path / "gemma"), "--method", "dart", "--out", str(tmp_path / "g")]) == 1
    line = next(line for line in capsys.readouterr().err.splitlines() if "is not supported" in line)  # one line
    assert "model_type 'gemma3' (Gemma3ForConditionalGeneration) is not supported; supported architectures:" in line
    assert "Qwen3VLForConditionalGeneration (qwen3_vl)" in line and "SmolVLMForConditionalGeneration (smolvlm)" in line
def test_export_and_run_with_an_in_llm_stage(tmp_path, image, capsys):
    out = tmp_path / "b"
    assert main(["export", "--model", "tiny-llava", "--method", "uniform", "--keep", "64", "--llm-method", "fastv",
                 "--llm-keep", "16", "--llm-layer", "1", "--kv-policy", "faithful", "--out", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    assert ("in-LLM stage: fastv L=1: 64 -> 16 (ratio=0.5); KV policy faithful; layer-average visual tokens 40.0; "
            "prefill runs prefill.onnx (fused attention)") in text
    assert "in-LLM: prefill.onnx vs the torch reference loop: kept slots identical" in text and "FAILED" not in text
    m = json.loads((out / Files.MANIFEST).read_text())
    assert m[Keys.LLM_STAGE_STAGES] == [{"layer": 1, "keep_in": 64, "keep_out": 16}]
    assert main(["inspect", str(out)]) == 0
    assert "in-LLM:    fastv L=1: 64 -> 16 (ratio=0.5); KV policy faithful" in capsys.readouterr().out
    assert main(["run", str(out), "--image", str(image), "--prompt", "What is it?", "--max-new-tokens", "2"]) == 0
    assert "in-LLM fastv from layer 1: kept 16 of 64 image tokens; slots of row 0:" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--llm-keep", "16"], "--llm-keep/--llm-layer/--llm-average/--llm-cfg need --llm-method"),
    (["--llm-method", "fastv", "--llm-keep", "80", "--llm-layer", "1"],
     "fastv: stage 1 L=1, K=64 -> K2=80, T=2: expected K2 <= K"),
    (["--llm-method", "fastv", "--llm-keep", "8,4", "--llm-layer", "1"], r"2 keep value(s) [8, 4] for 1 stage layer"),
    (["--llm-method", "dart", "--llm-keep", "x"], "--llm-keep 'x': expected comma-separated integers"),
    (["--llm-method", "dart", "--llm-layer", "1", "--llm-average", "16"],
     "a layer average of 16.0 visual tokens is impossible from K=64"),
])
def test_in_llm_options_are_checked_with_clear_errors(tmp_path, capsys, argv, message):
    assert main(["export", "--model", "tiny-llava", "--method", "uniform", "--keep", "64", *argv,
                 "--out", str(tmp_path / "b"), "-q"]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
