"""In-LLM pruning stages (METHODS_INLLM.md): one module per method, all behind
`build(name, keep=..., layer=..., **cfg)`; boundary.py applies a built method inside the LLM.

Every method module is imported here explicitly so that `build()` and `available()` see it.
"""
from edgeprune.inllm._registry import available, build, build_for_budget, register_stage
from edgeprune.inllm.base import KV_POLICIES, SIGNALS, LLMStage, Stage, StageChoice, StageSignals
from edgeprune.runtime.stages import keep_for_average, layer_average

from edgeprune.inllm import (  # noqa: F401  (registration side effect)
    d2pruner,
    dart,
    fastv,
    pdrop,
    polymorphic,
)

__all__ = ["build", "build_for_budget", "available", "register_stage", "LLMStage", "Stage", "StageChoice",
           "StageSignals", "SIGNALS", "KV_POLICIES", "keep_for_average", "layer_average"]
