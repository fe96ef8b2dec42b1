"""The runtime runs without torch and transformers: a subprocess blocks their import (meta-path
finder that raises) and still loads a bundle, runs it, and matches the tokens of the full install."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("torch", "transformers", "onnx", "onnxscript", "accelerate", "safetensors")

BLOCKER = textwrap.dedent(f"""
    import importlib.abc, sys
    BLOCKED = {BLOCKED!r}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked: the runtime must not import it")
            return None

    sys.meta_path.insert(0, Blocker())
    for mod in list(sys.modules):
        if mod.split(".")[0] in BLOCKED:
            del sys.modules[mod]
""")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from edgeprune.export.bundle import export_bundle
    from edgeprune.export.validate import seeded_images
    from edgeprune.models import load
    from PIL import Image

    adapter = load("tiny-llava")
    root = tmp_path_factory.mktemp("notorch")
    export_bundle(adapter, root / "bundle", method="attention", keep=16, validate=False)
    image = root / "image.png"
    Image.fromarray(seeded_images(adapter.preprocess_config.size, 1, seed=3)[0]).save(image)
    return root / "bundle", image


def _run(code: str, block: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", (BLOCKER if block else "") + textwrap.dedent(code)],
                          capture_output=True, text=True, cwd=ROOT, timeout=240,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_blocker_blocks():
    proc = _run("import torch\n")
    assert proc.returncode != 0 and "torch is blocked" in proc.stderr


def test_pipeline_runs_without_torch(bundle):
    path, image = bundle
    proc = _run(f"""
        import json, sys
        from edgeprune.runtime.pipeline import Pipeline
        result = Pipeline({str(path)!r}, threads=1)({str(image)!r}, "What is it?", max_new_tokens=6)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(json.dumps({{"ids": result.ids, "heavy": heavy, "k": int(result.positions.shape[1])}}))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == [] and out["k"] == 16 and len(out["ids"][0]) == 6

    from edgeprune.runtime.pipeline import Pipeline  # the same bundle with torch importable: same tokens

    assert Pipeline(path, threads=1)(str(image), "What is it?", max_new_tokens=6).ids == out["ids"]


def test_cli_run_and_inspect_without_torch(bundle):
    """The real `cli.main`: run, inspect, and export's clear refusal, with torch and transformers blocked."""
    path, image = bundle
    proc = _run(f"""
        from edgeprune.cli import main

        assert main(["inspect", {str(path)!r}]) == 0
        assert main(["run", {str(path)!r}, "--image", {str(image)!r}, "--prompt", "hi", "--max-new-tokens", "3",
                     "--threads", "1"]) == 0
        assert main(["export", "--model", "tiny-llava", "--out", "/nonexistent/x"]) == 1  # explains, no traceback
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pruner:    attention K=16" in proc.stdout
    assert "timing: preprocess" in proc.stderr
    assert "export needs the full install" in proc.stderr


def test_cli_run_on_a_bundle_leaves_torch_unimported(bundle):
    """With torch installed and importable, `edgeprune run BUNDLE` still never imports it (nor the pruners)."""
    path, image = bundle
    proc = _run(f"""
        import json, sys
        from edgeprune.cli import main

        code = main(["run", {str(path)!r}, "--image", {str(image)!r}, "--prompt", "hi", "--max-new-tokens", "3",
                     "--threads", "1"])
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r} or m.startswith("edgeprune.pruners"))
        print(json.dumps({{"code": code, "heavy": heavy}}))
    """, block=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"code": 0, "heavy": []}
    assert "timing: preprocess" in proc.stderr


def test_full_cli_builds_without_torch():
    proc = _run("""
        from edgeprune.cli import build_parser
        build_parser()
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_build_engine_and_device_path_import_without_torch(bundle):
    """Everything build-engine and the TensorRT path need imports with torch, transformers and onnx blocked;
    without TensorRT, build-engine explains what to install instead of failing on an import of torch."""
    path, _ = bundle
    proc = _run(f"""
        import sys
        import edgeprune.export.engine, edgeprune.cli.build_engine, edgeprune.runtime.trt, edgeprune.runtime.vision
        from edgeprune.runtime.format import write_manifest
        sys.modules["tensorrt"] = None                     # TensorRT absent, as on this machine
        from edgeprune.cli import main
        code = main(["build-engine", {str(path)!r}])
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print("RESULT", code, heavy)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT 1 []" in proc.stdout
    assert "build-engine needs TensorRT's Python package 'tensorrt'" in proc.stderr

