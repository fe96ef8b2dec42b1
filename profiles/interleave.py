"""Timing several systems on a busy machine: round-robin runs, medians, spreads and a noise flag.

Timing one point after another lets a change of load land on one point only (a sweep once showed
the K=64 vision graph slower than the unpruned one). Here every point is warmed up first, then
round r runs every point once, starting at point r mod P (the rotation stops one point from always
running first, e.g. right after a pause). A comparison between two points uses their runs of the
same round (paired), so a load change shifts both sides of each ratio together.

Spread = (max - min) / median of the per-round values. A comparison whose paired ratio spreads more
than NOISE_LIMIT_PCT is flagged NOISY instead of being printed as a confident number. Torch-free.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

__all__ = ["round_robin", "run_interleaved", "spread_pct", "paired_ratio", "NOISE_LIMIT_PCT", "NOISY"]

# A ratio whose per-round values span more than this share of its median does not support the
# comparison it states. 10 % = +-5 % around the median: enough to tell a 6.6x prefill speedup from its
# 6.07x token-count limit, or a pruner that costs 2 % of the vision graph from one that costs 10 %.
NOISE_LIMIT_PCT = 10.0
NOISY = "noisy: re-run on a quiet machine"


def round_robin(points: int, runs: int) -> list[tuple[int, int]]:
    """The (round, point) order of the timed runs: each round visits every point once, round r
    starting at point r mod `points`."""
    return [(r, (r + i) % points) for r in range(runs) for i in range(points)]


def run_interleaved(measures: Sequence[Callable[[], object]], runs: int, warmup: int = 1,
                    progress: Callable[[], None] | None = None) -> list[list[object]]:
    """Call each of `measures` `warmup` times (untimed, point by point), then `runs` rounds in
    `round_robin` order. Returns, per point, what its measure returned in each round (round order)."""
    for measure in measures:
        for _ in range(warmup):
            measure()
    samples: list[list[object]] = [[None] * runs for _ in measures]
    for r, p in round_robin(len(measures), runs):
        samples[p][r] = measures[p]()
        if progress:
            progress()
    return samples


def spread_pct(values: Sequence[float]) -> float | None:
    """100 * (max - min) / median; None for no values or a zero median."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return None
    median = float(np.median(arr))
    return None if median == 0 else 100.0 * float(arr.max() - arr.min()) / abs(median)


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float],
                 limit_pct: float = NOISE_LIMIT_PCT) -> dict:
    """numerator[r] / denominator[r] per round: median, min, max, spread % and whether it is noisy."""
    num, den = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    if num.shape != den.shape or num.size == 0:
        raise ValueError(f"paired values of {num.shape} and {den.shape}: expected the same non-zero number of rounds")
    ratios = num / den
    spread = spread_pct(ratios)
    return {"median": float(np.median(ratios)), "min": float(ratios.min()), "max": float(ratios.max()),
            "spread_pct": spread, "n": int(ratios.size), "noisy": spread is None or spread > limit_pct}
