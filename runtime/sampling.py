"""Next-token choice in numpy, shared by the torch reference (edgeprune/reference.py) and the runtime,
so both pick tokens with one algorithm and one random stream. No torch.

Greedy: argmax of the logits, first occurrence on ties (numpy's argmax rule).

Sampling (`sample_next`), for each row b in order 0..B-1, exactly:
1. x = logits[b] as float64 / temperature; p = exp(x - max(x)) / sum(exp(x - max(x))).
2. order = token ids by descending p, ties to the lower id (stable sort of -p).
3. top-p: keep the first n tokens of `order`, n = the smallest count whose cumulative p is >= top_p
   (top_p = 1.0 keeps every token; at least one token is always kept).
4. renormalise the kept probabilities; c = their cumulative sum, c[-1] set to exactly 1.
5. draw u = rng.random() (one float64 in [0, 1) per row per step, also for rows that already
   finished, so a row's draws do not depend on the others); the token is order[i] for the first i
   with u < c[i].
`rng` is a `numpy.random.Generator` made by `make_rng(seed)` (PCG64, seeded once per generate call).
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from edgeprune.errors import EdgepruneError
from edgeprune.runtime.checks import check_seed

__all__ = ["greedy_next", "sample_next", "next_tokens", "make_rng", "check_sampling"]


def make_rng(seed: int) -> np.random.Generator:
    """PCG64 seeded with `seed`, an integer >= 0 (numpy's own rule)."""
    return np.random.default_rng(check_seed(seed))


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_sampling(top_p: float, temperature: float) -> None:
    if not (_real(top_p) and 0.0 < top_p <= 1.0):
        raise EdgepruneError(f"top_p={top_p!r}, expected a number with 0 < top_p <= 1")
    if not (_real(temperature) and temperature > 0.0):
        raise EdgepruneError(f"temperature={temperature!r}, expected a finite number > 0 (use do_sample=False for "
                             "greedy)")


def greedy_next(logits: np.ndarray) -> np.ndarray:
    """logits [B, V] -> int64 [B], argmax with ties to the lowest id."""
    return np.asarray(logits).argmax(axis=-1).astype(np.int64)


def sample_next(logits: np.ndarray, rng: np.random.Generator, top_p: float = 1.0,
                temperature: float = 1.0) -> np.ndarray:
    """logits [B, V] -> int64 [B] by top-p sampling (module docstring, steps 1-5)."""
    check_sampling(top_p, temperature)
    logits = np.asarray(logits, dtype=np.float64)
    out = np.empty(logits.shape[0], dtype=np.int64)
    for b in range(logits.shape[0]):
        # 1. softmax at the temperature
        x = logits[b] / temperature
        p = np.exp(x - x.max())
        p /= p.sum()
        # 2. descending probability, ties to the lower id
        order = np.argsort(-p, kind="stable")
        sorted_p = p[order]
        # 3. the smallest prefix whose mass reaches top_p
        n = len(order) if top_p >= 1.0 else min(int(np.searchsorted(np.cumsum(sorted_p), top_p, side="left")) + 1,
                                                 len(order))
        # 4. renormalise the kept mass
        c = np.cumsum(sorted_p[:n])
        c /= c[-1]
        c[-1] = 1.0
        # 5. one uniform draw per row
        u = rng.random()
        out[b] = order[min(int(np.searchsorted(c, u, side="right")), n - 1)]
    return out


def next_tokens(logits: np.ndarray, do_sample: bool, rng: np.random.Generator | None,
                top_p: float = 1.0, temperature: float = 1.0) -> np.ndarray:
    """Greedy or sampled next ids [B] (the one entry point both pipelines call)."""
    if not do_sample:
        return greedy_next(logits)
    if rng is None:
        raise EdgepruneError("sampling needs an rng (runtime.sampling.make_rng(seed))")
    return sample_next(logits, rng, top_p=top_p, temperature=temperature)
