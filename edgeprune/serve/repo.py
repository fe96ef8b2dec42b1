"""`edgeprune triton-repo`: a Triton model repository for a stock Triton server or NVIDIA's container.

    REPO/edgeprune/config.pbtxt        Python backend, dynamic batcher, instances, the tensors of serve/protocol.py
    REPO/edgeprune/1/model.py          TritonPythonModel around serve/engine.py's Engine (what `edgeprune serve` runs)
    REPO/edgeprune/1/edgeprune/        the torch-free runtime, vendored (so the container needs no edgeprune install)
    REPO/edgeprune/1/bundle/           the bundle, copied and verified
    REPO/README.md                     how to start it

The container then needs only the runtime's packages (numpy, onnxruntime or onnxruntime-gpu, tokenizers, pillow,
pyyaml, psutil). Unlike `edgeprune serve` (PyTriton), the Python backend can fail one request of a batch with a
real Triton error, so a bad request gets HTTP 400 with the message (and no `error` output).
The repository appears atomically (built beside REPO, renamed into place).
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeprune.errors import EdgepruneError
from edgeprune.serve.protocol import INPUTS, MODEL_NAME, OUTPUTS

__all__ = ["RepoOptions", "write_repo", "config_pbtxt", "MODEL_PY"]

TRITON_TYPES = {bytes: "TYPE_STRING", np.int32: "TYPE_INT32", np.int64: "TYPE_INT64", np.float32: "TYPE_FP32"}
VENDORED = {"edgeprune": ("__init__.py", "errors.py", "fileio.py"), "edgeprune/serve": ("__init__.py", "protocol.py", "engine.py")}


@dataclass(frozen=True)
class RepoOptions:
    max_batch: int = 16
    max_queue_delay_us: int = 5000
    instances: int = 1
    providers: tuple[str, ...] = ("cpu",)   # ONNX Runtime providers in priority order (cuda, tensorrt, cpu)
    threads: int = 0                        # ORT intra-op threads per instance; 0: ORT's choice


def _dims(dims) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def config_pbtxt(options: RepoOptions) -> str:
    tensors = []
    for name, dtype, dims, optional in INPUTS:
        extra = " optional: true" if optional else ""
        tensors.append(f'input {{ name: "{name}" data_type: {TRITON_TYPES[dtype]} dims: {_dims(dims)}{extra} }}')
    for name, dtype, dims in OUTPUTS:
        tensors.append(f'output {{ name: "{name}" data_type: {TRITON_TYPES[dtype]} dims: {_dims(dims)} }}')
    params = {"providers": ",".join(options.providers), "threads": str(options.threads)}
    return "\n".join([
        f'name: "{MODEL_NAME}"',
        'backend: "python"',
        f"max_batch_size: {options.max_batch}",
        f"dynamic_batching {{ max_queue_delay_microseconds: {options.max_queue_delay_us} }}",
        # the Python model runs on the CPU; ONNX Runtime's providers (parameters) decide where the graphs run
        f"instance_group [ {{ count: {options.instances} kind: KIND_CPU }} ]",
        *tensors,
        *(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items()),
    ]) + "\n"


MODEL_PY = '''"""Triton Python-backend model written by `edgeprune triton-repo`: the edgeprune bundle beside this file, batched
by Triton's dynamic batcher, answered by the vendored torch-free runtime (edgeprune/serve/engine.py)."""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # the vendored edgeprune package

import triton_python_backend_utils as pb_utils  # noqa: E402  (provided by Triton's Python backend)

from edgeprune.serve.engine import Engine  # noqa: E402
from edgeprune.serve.protocol import INPUTS, OUTPUTS  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        providers = [p for p in params.get("providers", "cpu").split(",") if p]
        threads = int(params.get("threads", "0")) or None
        self.engine = Engine(os.path.join(HERE, "bundle"), threads=threads, providers=providers)

    def execute(self, requests):
        tensors = []
        for request in requests:
            found = {}
            for name, _, _, _ in INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    found[name] = tensor.as_numpy()
            tensors.append(found)
        responses = []
        for out in self.engine.infer(tensors):
            error = out["error"].reshape(-1)[0].decode("utf-8")
            if error:   # this request only: the others of the batch are answered
                code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
                err = pb_utils.TritonError(error, code) if code is not None else pb_utils.TritonError(error)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=err))
            else:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, out[name]) for name, _, _ in OUTPUTS]))
        return responses
'''

README = """# Triton model repository written by `edgeprune triton-repo`

Model `{model}`: {bundle} (K = {keep}), Python backend, dynamic batching up to {max_batch}, {instances} instance(s),
ONNX Runtime providers {providers}.

With NVIDIA's container (any recent `nvcr.io/nvidia/tritonserver:<yy.mm>-py3`; on Jetson the iGPU image):

    docker run --rm --net=host -v $PWD/{name}:/models nvcr.io/nvidia/tritonserver:24.10-py3 bash -c \\
      "pip install numpy onnxruntime tokenizers pillow pyyaml psutil && tritonserver --model-repository=/models"

(`onnxruntime-gpu` instead of `onnxruntime` for the cuda/tensorrt providers; `--gpus all` with a GPU.)
Ask it: inputs image (BYTES, one or more image files), prompt (BYTES), optional max_new_tokens (INT32), temperature
and top_p (FP32), seed (INT64); outputs text, finish_reason, positions, prompt_tokens, completion_tokens,
timings_ms, batch_size. Scale with `instance_group` count in config.pbtxt, or by replicas behind a load balancer.
"""


def write_repo(bundle: str | Path, out: str | Path, options: RepoOptions = RepoOptions(), force: bool = False) -> Path:
    """Write the repository to `out` (refused if it exists, unless `force` and it is a repository written here)."""
    import edgeprune
    import edgeprune.runtime
    from edgeprune.runtime.bundle import load_bundle

    out = Path(out)
    if out.exists():
        if not force:
            raise EdgepruneError(f"{out} exists; pass --force to replace it")
        if not (out / MODEL_NAME / "config.pbtxt").is_file():
            raise EdgepruneError(f"{out} exists and is not a repository written by edgeprune triton-repo: not replaced")
    for name, least in (("max_batch", 1), ("instances", 1), ("max_queue_delay_us", 0), ("threads", 0)):
        if getattr(options, name) < least:
            raise EdgepruneError(f"--{name.replace('_', '-')} {getattr(options, name)}: expected an integer >= {least}")
    loaded = load_bundle(bundle, verify=True)   # refuse a broken bundle here, not in the container
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model = tmp / MODEL_NAME
        version = model / "1"
        shutil.copytree(loaded.path, version / "bundle")
        package = Path(edgeprune.__file__).parent
        for folder, files in VENDORED.items():
            source = package.joinpath(*folder.split("/")[1:])
            (version / folder).mkdir(parents=True, exist_ok=True)
            for name in files:
                shutil.copy2(source / name, version / folder / name)
        shutil.copytree(Path(edgeprune.runtime.__file__).parent, version / "edgeprune" / "runtime",
                        ignore=shutil.ignore_patterns("__pycache__"))
        (version / "model.py").write_text(MODEL_PY)
        (model / "config.pbtxt").write_text(config_pbtxt(options))
        (tmp / "README.md").write_text(README.format(model=MODEL_NAME, bundle=loaded.path.name, keep=loaded.keep,
                                                     max_batch=options.max_batch, instances=options.instances,
                                                     providers=",".join(options.providers), name=out.name))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
