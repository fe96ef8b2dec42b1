"""The pruner's own cost inside a vision graph, measured with ONNX Runtime's per-node profile.

Why not vision(K) - vision(N) of two bundles: that subtracts two timings of a few hundred ms to
find a few ms, so the answer carries the noise of the large numbers (a busy machine once turned a
~1-2 % pruner into "82 %"). Here a profiled session of the bundle's own vision graph times every
node of each run; the pruner's share is its nodes' time over all nodes' time in the same run, so a
load change scales numerator and denominator together. The profiled session is a second session
of the same graph, so the pipeline that is being timed carries no profiling overhead.

Which nodes are the pruner's: the exporter traces `VisionGraph`, whose pruner is the submodule
`pruner`, so the exported nodes are named "/pruner/..." and ORT keeps that name, also on most fused
nodes ("/pruner/MatMul/MatmulTransposeFusion/"). A few fusions name their node without a scope
("BiasGelu_token_33"); such a node is counted with the nearest scoped node before it in execution
order (the sequential executor runs a topological order, so that is the node it was fused from),
and the report says how much time was attributed that way. With a provider that takes the whole
graph as one node (TensorRT), no node is the pruner's and the cost is reported as unavailable.
Torch-free.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from edgeprune.runtime.format import VISION_INPUT, Files

__all__ = ["PrunerProfile", "node_times", "PRUNER_SCOPE"]

PRUNER_SCOPE = "/pruner/"
_KERNEL = "_kernel_time"


def node_times(events: list[dict]) -> list[dict]:
    """ORT profile events -> per model run: {"pruner_s", "graph_s", "inferred_s", "pruner_nodes"}.

    graph_s sums every node's kernel time; pruner_s the nodes under PRUNER_SCOPE, including unscoped
    (fused) nodes that follow a pruner node in execution order (their time is also in inferred_s)."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    nodes = sorted((e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith(_KERNEL)),
                   key=lambda e: e["ts"])
    out = []
    for run in runs:
        start, end = run["ts"], run["ts"] + run["dur"]
        pruner = graph = inferred = 0
        count = 0
        scope_is_pruner = False
        for e in nodes:
            if not start <= e["ts"] <= end:
                continue
            name = e["name"][:-len(_KERNEL)]
            scoped = name.startswith("/")
            if scoped:
                scope_is_pruner = name.startswith(PRUNER_SCOPE)
            graph += e["dur"]
            if scope_is_pruner:
                pruner += e["dur"]
                count += 1
                if not scoped:
                    inferred += e["dur"]
        out.append({"pruner_s": pruner * 1e-6, "graph_s": graph * 1e-6, "inferred_s": inferred * 1e-6,
                    "pruner_nodes": count})
    return out


class PrunerProfile:
    """A profiled ORT session of a bundle's (default) vision graph: `run()` once per round, then
    `finish(skip=warmup)` returns node_times() of the runs after the first `skip`."""

    def __init__(self, bundle, pixels: np.ndarray, providers: list | None = None, threads: int | None = None):
        import onnxruntime as ort

        from edgeprune.runtime.providers import session_options

        self._dir = Path(tempfile.mkdtemp(prefix="edgeprune-ortprofile-"))
        opts = session_options(threads)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(self._dir / "vision")
        self.session = ort.InferenceSession(str(bundle.path / Files.VISION), opts, providers=providers)
        self.pixels = pixels

    def run(self) -> None:
        self.session.run(None, {VISION_INPUT: self.pixels})

    def finish(self, skip: int = 0) -> list[dict]:
        try:
            path = self.session.end_profiling()
            events = json.loads(Path(path).read_text())
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
        return node_times(events)[skip:]

    def __del__(self):
        if os.path.isdir(getattr(self, "_dir", "")):
            shutil.rmtree(self._dir, ignore_errors=True)
