"""Serving tests: a real `edgeprune serve` (PyTriton's Triton) on loopback, run from .venv-serve (scripts/setup.sh),
on a tiny-llava bundle. Skipped, with the reason, where that environment cannot exist (no Debian python3.11)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVE_PYTHON = ROOT / ".venv-serve" / "bin" / "python"
KEEP = 16


def serve_env_problem() -> str | None:
    if not SERVE_PYTHON.exists():
        return f"{SERVE_PYTHON} missing (scripts/setup.sh builds it where Debian's python3.11 + libpython3.11 exist)"
    check = subprocess.run([str(SERVE_PYTHON), "-c", "import pytriton.triton; from edgeprune.serve.libpython import "
                            "problem; import sys; r = problem(); print(r or ''); sys.exit(1 if r else 0)"],
                           capture_output=True, text=True, timeout=120)
    return None if check.returncode == 0 else f".venv-serve cannot serve: {(check.stdout + check.stderr)[-300:]}"


@pytest.fixture(scope="session")
def serve_python() -> Path:
    problem = serve_env_problem()
    if problem:
        pytest.skip(problem)
    return SERVE_PYTHON


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    from edgeprune.export.bundle import export_bundle
    from edgeprune.models import load

    out = tmp_path_factory.mktemp("serve-bundle") / "tiny"
    export_bundle(load("tiny-llava"), out, method="divprune", keep=KEEP, validate=False)
    return out


@pytest.fixture(scope="session")
def single(tiny_bundle):
    """(image bytes, prompt, max_new_tokens) -> the answer of the bundle run alone in this process (the runtime)."""
    import io

    from PIL import Image

    from edgeprune.runtime.pipeline import Pipeline

    pipe = Pipeline(tiny_bundle, threads=1)
    cache = {}

    def answer(image: bytes, prompt: str, max_new_tokens: int):
        key = (image, prompt, max_new_tokens)
        if key not in cache:
            cache[key] = pipe(Image.open(io.BytesIO(image)), prompt, max_new_tokens=max_new_tokens)
        return cache[key]
    return answer
