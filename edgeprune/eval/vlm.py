"""VLM accuracy vs K: the aligned model answers held-out Fashion-MNIST questions, pruned and not.

Answers come from the torch reference pipeline itself (`reference.generate`: prune, project, lay
out the prompt, position ids, prefill, greedy decode), fed from cached encoder signals
(eval/features.py) through `CachedAdapter`, so the encoder runs once per image however many
methods and budgets are measured. Score: exact class-name match (eval/data.py `match_class`), and
agreement = the pruned answer equals the unpruned answer (normalised text).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from edgeprune.errors import EdgepruneError
from edgeprune.eval.data import PROMPT, match_class, normalize_answer
from edgeprune.models.base import Signals

__all__ = ["CachedAdapter", "build_method", "method_label", "answers", "agreement", "EvalResult", "evaluate", "sweep",
           "SWEEP_KEEPS"]

log = logging.getLogger(__name__)

SWEEP_KEEPS = (576, 192, 128, 64, 32, 16, 8)


class CachedAdapter:
    """The adapter as `reference.generate` sees it, with `preprocess`/`encode` served from cached
    signals: "images" are row numbers into `signals` (dict of [n, ...] tensors from
    `features.cached_signals`); `pixels` (AD-BTS only) are recomputed from the raw images."""

    def __init__(self, adapter, signals: dict, images):
        self._adapter, self._signals, self._images = adapter, signals, images

    def __getattr__(self, name):
        return getattr(self._adapter, name)

    def preprocess(self, rows) -> torch.Tensor:
        return torch.as_tensor(np.asarray(rows).reshape(-1), dtype=torch.long)

    def encode(self, rows: torch.Tensor, need=("tokens",)) -> Signals:
        a, s = self._adapter, self._signals
        out = Signals(grid=a.grid)
        feats = s["feats"][rows].float()                                          # [B, N, C]
        if "feats" in need:
            out.feats = feats
        if "tokens" in need:
            out.tokens = a.project(feats)                                        # [B, N, D_llm]
        for name in ("keys", "attn"):
            if name in need:
                if name not in s:
                    raise EdgepruneError(f"cached signals have no {name!r}; encode with kind='eval'")
                setattr(out, name, s[name][rows].float())
        if "pixels" in need:
            out.pixels = a.preprocess([self._images[int(i)] for i in rows])
        return out


def build_method(adapter, method: str, keep: int | None, seed: int = 0, **cfg):
    """The pruner for (method, K) with the model's options; None for K = None or K = N (no pruning:
    METHODS.md makes K = N the identity for every method). `seed` goes to methods that take one."""
    from edgeprune.pruners import available, build_for_model

    if keep is None or keep == adapter.num_image_tokens:
        return None
    if method in available() and "seed" in available()[method].defaults and "seed" not in cfg:
        cfg["seed"] = seed
    if hasattr(adapter, "build_pruner"):          # the adapter's own rule (the one export uses)
        return adapter.build_pruner(method, keep, **cfg)
    return build_for_model(method, keep, adapter.pruner_options(), **cfg)


def method_label(method: str, pruner) -> str:
    """The name a report gives the method: the pruner's own label when it has one ("autoselect
    (untrained)" for the random-scorer baseline), else the method name."""
    return pruner.label() if hasattr(pruner, "label") else method


@torch.no_grad()
def answers(adapter, cached: CachedAdapter, pruner, rows, batch: int = 16, max_new_tokens: int = 8,
            prompt: str = PROMPT, llm=None, llm_stage=None, kv_policy: str = "uniform") -> list[str]:
    """Greedy answers of the reference pipeline for cached rows, `batch` images per call (`llm`: an exported
    LLM through the runtime instead of the torch one, reference.generate; with an in-LLM stage inside the
    prefill when `llm_stage` is given)."""
    from edgeprune.reference import generate

    out: list[str] = []
    rows = list(rows)
    for i in range(0, len(rows), batch):
        res = generate(cached, pruner, rows[i:i + batch], prompt, max_new_tokens=max_new_tokens, llm=llm,
                       llm_stage=llm_stage, kv_policy=kv_policy)
        out.extend(t.strip() for t in res.text)
    return out


@dataclass
class EvalResult:
    method: str
    keep: int
    n: int
    accuracy: float
    agreement: float | None          # vs the unpruned answers (None for the unpruned run itself)
    seconds: float
    answers: list[str] = field(default_factory=list, repr=False)
    error: str | None = None

    def row(self) -> dict:
        d = asdict(self)
        d.pop("answers")
        return d


def _score(texts: list[str], labels: np.ndarray) -> float:
    return float(np.mean([match_class(t) == int(y) for t, y in zip(texts, labels)]))


def agreement(texts: list[str], ref: list[str]) -> float:
    """Fraction of answers equal (normalised) to the reference (unpruned) answers of the same images."""
    return float(np.mean([normalize_answer(a) == normalize_answer(b) for a, b in zip(texts, ref)]))


def evaluate(adapter, cached: CachedAdapter, labels: np.ndarray, method: str, keep: int | None,
             reference: list[str] | None = None, seed: int = 0, batch: int = 16, llm=None, llm_stage=None,
             kv_policy: str = "uniform", **cfg) -> EvalResult:
    """Accuracy (and agreement with `reference`, the unpruned answers) of one (method, K), optionally followed
    by an in-LLM stage (`llm_stage`, built for K)."""
    n_img = adapter.num_image_tokens
    k = n_img if keep is None else keep
    start = time.time()
    try:
        pruner = build_method(adapter, method, keep, seed=seed, **cfg)
        method = method_label(method, pruner)
        texts = answers(adapter, cached, pruner, range(len(labels)), batch=batch, llm=llm, llm_stage=llm_stage,
                        kv_policy=kv_policy)
    except EdgepruneError as err:
        log.warning("%s K=%d failed: %s", method, k, err)
        return EvalResult(method, k, len(labels), float("nan"), None, time.time() - start, error=str(err))
    agree = agreement(texts, reference) if reference is not None else None
    return EvalResult(method, k, len(labels), _score(texts, labels), agree, time.time() - start, answers=texts)


def sweep(adapter, cached: CachedAdapter, labels: np.ndarray, methods, keeps=SWEEP_KEEPS, seed: int = 0,
          batch: int = 16, options: dict[str, dict] | None = None, llm=None) -> tuple[EvalResult | None, list[EvalResult]]:
    """(unpruned result, one result per method and K < N). K = N is the unpruned run for every
    method (the contract's identity), measured once, and only when N is in `keeps` (it is the costliest
    point; without it there is no agreement figure). `options`: {method: pruner options}; `llm`: evaluate()'s."""
    full = None
    if adapter.num_image_tokens in keeps:
        full = evaluate(adapter, cached, labels, "none", None, seed=seed, batch=batch, llm=llm)
        log.info("unpruned: accuracy %.3f (n=%d, %.0f s)", full.accuracy, full.n, full.seconds)
    results = []
    for method in methods:
        for k in keeps:
            if k >= adapter.num_image_tokens:
                continue
            r = evaluate(adapter, cached, labels, method, k, reference=full.answers if full else None, seed=seed,
                         batch=batch, llm=llm, **(options or {}).get(method, {}))
            log.info("%s K=%d: accuracy %.3f agreement %s (%.0f s)", r.method, k, r.accuracy, r.agreement, r.seconds)
            results.append(r)
    return full, results
