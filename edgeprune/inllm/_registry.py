"""In-LLM stage registry: `@register_stage` at the definition, `build()` and `available()` for users
(the habits of pruners/_registry.py)."""
from __future__ import annotations

from dataclasses import dataclass

from edgeprune.errors import PrunerConfigError
from edgeprune.inllm.base import LLMStage
from edgeprune.registry import Registry

__all__ = ["register_stage", "build", "build_for_budget", "available", "StageInfo"]

_REGISTRY = Registry("in-LLM method", fixed=("keep", "layer"))
_STAGES: dict[str, type[LLMStage]] = _REGISTRY.classes


@dataclass(frozen=True)
class StageInfo:
    name: str
    description: str
    requires: tuple[str, ...]
    default_layers: tuple[int, ...]
    defaults: dict           # config keyword -> default (keep and layer excluded)


def register_stage(name: str):
    """Class decorator: registers under `name` (= module file = --llm-method value). Duplicates are errors."""
    return _REGISTRY.register(name)


def available() -> dict[str, StageInfo]:
    """Every registered in-LLM method, sorted by name."""
    return {name: StageInfo(name=name, description=cls.description, requires=cls.requires,
                            default_layers=tuple(cls.default_layers),
                            defaults={k: p.default for k, p in _REGISTRY.options(cls).items()})
            for name, cls in sorted(_STAGES.items())}


def build(name: str, keep=None, layer=None, **cfg) -> LLMStage:
    """Instantiate in-LLM method `name`; unknown names or options are clear errors."""
    return _REGISTRY.checked(name, cfg)(keep=keep, layer=layer, **cfg).eval()


def build_for_budget(name: str, *, num_image: int, num_layers: int, keep=None, layer=None,
                     average: float | None = None, **cfg) -> LLMStage:
    """`build()` with the budget as counts (`keep`) or as a layer average (`average`, solved for these layers
    with runtime.stages.keep_for_average), checked against K = `num_image` and T = `num_layers`."""
    from edgeprune.runtime.stages import keep_for_average

    if average is not None:
        if keep is not None:
            raise PrunerConfigError(f"{name}: give the in-LLM budget as counts (keep) or as a layer average, not both")
        _REGISTRY.checked(name, cfg)   # unknown method or option: that error first
        layers = layer if layer is not None else _STAGES[name].default_layers
        keep = keep_for_average(name, num_image, num_layers, list(layers), average)
    stage = build(name, keep=keep, layer=layer, **cfg)
    stage.bind(num_image, num_layers)   # every budget error now, before any model work
    return stage
