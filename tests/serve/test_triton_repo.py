"""`edgeprune triton-repo`: the repository loads in the Triton server binary that PyTriton ships (started as a
stock server: `tritonserver --model-repository`), answers what the bundle answers alone, and fails a bad request
alone with HTTP 400. Plus the files it writes and what it refuses."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request

import pytest

from edgeprune.errors import BundleError, EdgepruneError
from edgeprune.serve.bench import free_ports, workload
from edgeprune.serve.protocol import INPUTS, OUTPUTS
from edgeprune.serve.repo import RepoOptions, write_repo

CLIENT = """
import json, sys
import numpy as np
from edgeprune.serve.bench import request_tensors, workload
from edgeprune.serve.openai import TritonHttp
client, out = TritonHttp(sys.argv[1]), []
work = workload(3)
for image, prompt in work:
    result = client.infer(request_tensors(image, prompt, 8))
    out.append([result["text"][0][0].decode(), result["positions"][0][0].tolist()])
two = request_tensors(work[0][0], work[0][1], 8)
two["image"] = np.array([[work[0][0], work[1][0]]], dtype=object)     # two images, one prompt: an answer each
out.append([t.decode() for t in client.infer(two)["text"][0]])
try:
    client.infer(request_tensors(b"broken", "hi", 8))
except Exception as err:
    out.append(str(err))
print(json.dumps(out))
"""


def stock_tritonserver(serve_python, root):
    """PyTriton's Triton distribution laid out as a plain server: its binary, the Python backend with the stub for
    this Python version, and the environment PyTriton itself gives it (LD_LIBRARY_PATH, PATH)."""
    code = ("import sys, pytriton, pathlib; p = pathlib.Path(pytriton.__file__).parent; "
            "print(p / 'tritonserver'); print(p.parent / 'nvidia_pytriton.libs'); "
            "print(f'{sys.version_info.major}.{sys.version_info.minor}')")
    dist, libs, version = subprocess.run([str(serve_python), "-c", code], capture_output=True, text=True,
                                         check=True).stdout.split()
    server = root / "tritonserver"
    shutil.copytree(dist, server, ignore=shutil.ignore_patterns("python_backend_stubs"))
    shutil.copy2(f"{dist}/python_backend_stubs/{version}/triton_python_backend_stub", server / "backends" / "python")
    env = dict(os.environ, LD_LIBRARY_PATH=libs, PATH=f"{serve_python.parent}:{os.environ['PATH']}")
    return server, env


def test_repository_loads_in_a_stock_tritonserver(serve_python, tiny_bundle, single, tmp_path):
    repo = write_repo(tiny_bundle, tmp_path / "repo", RepoOptions(max_batch=4, threads=1))
    server, env = stock_tritonserver(serve_python, tmp_path)
    http, grpc, metrics = free_ports(3)
    log = open(tmp_path / "tritonserver.log", "wb")
    proc = subprocess.Popen([str(server / "bin" / "tritonserver"), f"--model-repository={repo}",
                             f"--backend-directory={server / 'backends'}", "--http-address=127.0.0.1",
                             f"--http-port={http}", "--grpc-address=127.0.0.1", f"--grpc-port={grpc}",
                             f"--metrics-port={metrics}", "--allow-gpu-metrics=false"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "tritonserver.log").read_text()[-3000:]
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/edgeprune/ready", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        result = subprocess.run([str(serve_python), "-c", CLIENT, f"127.0.0.1:{http}"], capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        *answers, pair, error = json.loads(result.stdout)
        work = workload(3)
        for (image, prompt), (text, positions) in zip(work, answers):
            alone = single(image, prompt, 8)
            assert text == alone.texts[0] and positions == alone.positions[0].tolist()
        assert pair == [single(work[0][0], work[0][1], 8).texts[0], single(work[1][0], work[0][1], 8).texts[0]]
        assert "[400]" in error and "image 0: cannot decode" in error
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


def test_repository_files_and_refusals(tiny_bundle, tmp_path):
    repo = write_repo(tiny_bundle, tmp_path / "repo", RepoOptions(max_batch=8, instances=2, providers=("cuda", "cpu")))
    config = (repo / "edgeprune" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "max_batch_size: 8" in config and "count: 2 kind: KIND_CPU" in config
    assert 'string_value: "cuda,cpu"' in config
    for name, *_ in (*INPUTS, *OUTPUTS):
        assert f'name: "{name}"' in config
    version = repo / "edgeprune" / "1"
    assert (version / "model.py").is_file() and (version / "bundle" / "manifest.json").is_file()
    assert (version / "edgeprune" / "runtime" / "pipeline.py").is_file()
    assert (version / "edgeprune" / "serve" / "engine.py").is_file()
    with pytest.raises(EdgepruneError, match="exists; pass --force"):
        write_repo(tiny_bundle, repo)
    write_repo(tiny_bundle, repo, force=True)                       # replaces its own repository
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(EdgepruneError, match="not a repository"):
        write_repo(tiny_bundle, mine, force=True)
    assert (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(BundleError):
        write_repo(tmp_path / "no-bundle", tmp_path / "other")
    with pytest.raises(EdgepruneError, match="--max-batch 0: expected an integer >= 1"):
        write_repo(tiny_bundle, tmp_path / "other", RepoOptions(max_batch=0))
    assert not (tmp_path / "other").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp folder left behind


def test_vendored_runtime_imports_on_its_own(tiny_bundle, tmp_path):
    """The repository's edgeprune copy must be complete: every module the runtime and the serve engine import
    comes from it, never from the edgeprune installed beside the test (an editable install would hide a file
    missing from VENDORED; Triton's container has no edgeprune at all)."""
    import sys

    version = write_repo(tiny_bundle, tmp_path / "repo") / "edgeprune" / "1"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import edgeprune.runtime.pipeline, edgeprune.serve.engine; "
            "print('\\n'.join(m.__file__ for n, m in sys.modules.items() if n.split('.')[0] == 'edgeprune'))")
    out = subprocess.run([sys.executable, "-c", code, str(version)], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    outside = [f for f in out.stdout.split() if not f.startswith(str(version))]
    assert not outside, outside
