"""Pruners: one module per METHODS.md method, all behind `build(name, keep=K, **cfg)`.

Every pruner module is imported here explicitly so that `build()` and `available()` see it.
"""
from edgeprune.pruners._registry import available, build, build_for_model, options_by_method, register_pruner
from edgeprune.pruners.base import SIGNALS, Pruner, PrunerLike, Selection

from edgeprune.pruners import (  # noqa: F401  (registration side effect)
    adbts,
    attention,
    autoselect,
    d2pruner,
    dart,
    divprune,
    dpc,
    polymorphic,
    random,
    uniform,
    visionzip,
)

__all__ = ["build", "build_for_model", "available", "options_by_method", "register_pruner", "Pruner", "PrunerLike",
           "Selection", "SIGNALS"]
