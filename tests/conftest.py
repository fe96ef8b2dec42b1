"""Shared fixtures: seeded synthetic signals shaped like a real encoder's (METHODS.md, Common contract)."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch

PATCH = 14


def make_signals(batch: int = 2, grid: tuple[int, int] = (24, 24), dim: int = 32, feat_dim: int = 24,
                 key_dim: int = 8, seed: int = 0) -> dict:
    """Random but well-conditioned signals: every pruner in `available()` can run on them."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    n = h * w
    attn = torch.rand(batch, n, generator=g)
    return {
        "tokens": torch.randn(batch, n, dim, generator=g),
        "feats": torch.randn(batch, n, feat_dim, generator=g),
        "keys": torch.randn(batch, n, key_dim, generator=g),
        "attn": attn / attn.sum(-1, keepdim=True),
        "grid": (h, w),
        "pixels": torch.randn(batch, 3, h * PATCH, w * PATCH, generator=g),
    }


def baseline_options(method: str) -> dict:
    """Options that let any registered method run without trained weights: the untrained scorer
    ("random") for methods with a learned scorer (autoselect refuses to pick one silently)."""
    from edgeprune.pruners import available

    return {"scorer": "random"} if "scorer" in available()[method].defaults else {}


def row(signals: dict, b: int) -> dict:
    """Batch row b of `signals`, keeping the batch dimension."""
    return {k: (v if k == "grid" else v[b:b + 1]) for k, v in signals.items()}


@pytest.fixture
def signals():
    return make_signals()


@pytest.fixture(autouse=True)
def _drop_cli_log_handler():
    """cli.main installs a StreamHandler on the (captured) stderr; drop it so later logging does
    not write to a closed capture stream."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if type(h) is logging.StreamHandler]:
        root.removeHandler(handler)


@pytest.fixture
def transformers_deprecations():
    """A function returning the deprecation notices transformers emitted so far in the test: FutureWarnings
    and its log lines (e.g. "`past_key_values`/`cache_params` are deprecated"). warning_once's memory is
    cleared first, so a notice an earlier test triggered is seen again."""
    import warnings

    from transformers.utils import logging as hf_logging

    logged: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            logged.append(record.getMessage())

    logging.Logger.warning_once.cache_clear()
    handler = Collect(level=logging.WARNING)
    root = hf_logging.get_logger("transformers")
    root.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield lambda: logged + [str(w.message) for w in caught
                                if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    root.removeHandler(handler)


def load_script(name: str):
    """scripts/NAME.py imported as a module (scripts/ is not a package), for tests of its pieces."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
