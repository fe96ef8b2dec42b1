"""Pruner registry: `@register_pruner` at the definition, `build()` and `available()` for users."""
from __future__ import annotations

from dataclasses import dataclass

from edgeprune.errors import PrunerConfigError
from edgeprune.pruners.base import Pruner
from edgeprune.registry import Registry

__all__ = ["register_pruner", "build", "build_for_model", "available", "PrunerInfo", "options_by_method"]

_REGISTRY = Registry("pruner", fixed=("keep",))
_PRUNERS: dict[str, type[Pruner]] = _REGISTRY.classes


@dataclass(frozen=True)
class PrunerInfo:
    name: str
    description: str
    requires: tuple[str, ...]
    space: str
    defaults: dict           # config keyword -> default (keep excluded); required ones map to inspect.Parameter.empty
    extra_outputs: tuple[str, ...]
    default_positions: str | None


def register_pruner(name: str):
    """Class decorator: registers under `name` (= module file = --method value). Duplicates are errors."""
    return _REGISTRY.register(name)


def available() -> dict[str, PrunerInfo]:
    """Every registered pruner, sorted by name."""
    return {
        name: PrunerInfo(name=name, description=cls.description, requires=cls.requires, space=cls.space,
                         defaults={k: p.default for k, p in _REGISTRY.options(cls).items()},
                         extra_outputs=cls.extra_outputs, default_positions=cls.default_positions)
        for name, cls in sorted(_PRUNERS.items())
    }


def build(name: str, keep: int, **cfg) -> Pruner:
    """Instantiate pruner `name` with budget `keep`; unknown names or config keys are clear errors."""
    return _REGISTRY.checked(name, cfg)(keep=keep, **cfg).eval()


def options_by_method(methods: list[str], cfg: dict) -> dict[str, dict]:
    """Options given once for several methods (`--cfg` of eval / sweep) -> {method: the ones it takes};
    an option that none of the methods takes is an error."""
    accepted = {m: set(_REGISTRY.options(_PRUNERS[m])) if m in _PRUNERS else set() for m in methods}
    unused = sorted(k for k in cfg if not any(k in a for a in accepted.values()))
    if unused:
        raise PrunerConfigError(f"--cfg {', '.join(unused)}: none of the methods {', '.join(methods)} takes "
                                f"this option")
    return {m: {k: v for k, v in cfg.items() if k in accepted[m]} for m in methods}


def build_for_model(name: str, keep: int, model_options: dict, **cfg) -> Pruner:
    """`build()` with the model's facts (Adapter.pruner_options()) filled in for the options this
    method accepts; explicit `cfg` wins. The one rule export and generate use for every method."""
    if name not in _PRUNERS:
        return build(name, keep, **cfg)  # raises the unknown-pruner error
    accepted = _REGISTRY.options(_PRUNERS[name])
    merged = {k: v for k, v in model_options.items() if k in accepted}
    merged.update(cfg)
    return build(name, keep, **merged)
