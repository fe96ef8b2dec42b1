"""In-LLM stages as the runtime sees them (METHODS_INLLM.md §1): counts, KV groups, masks, predictions.

Torch-free (numpy only): the runtime, the exporter, the profiler and the torch reference share it.
A plan is the list of stages (L, K_in -> K_out) of one bundle, its KV policy and where the image sits
in the prompt (S, the prefix length). The prefill graph (prefill.onnx) applies the stages; decode runs
the ordinary decoder graph with one attention mask per KV group: one under "uniform" (every layer's
cache was gathered), one per stage boundary under "faithful" (layers < L_1 keep the full sequence).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgeprune.errors import BundleError, EdgepruneError
from edgeprune.runtime.format import Keys, Stage

__all__ = ["StagePlan", "layer_average", "keep_for_average", "half_up", "KV_POLICIES"]

KV_POLICIES = ("uniform", "faithful")


def half_up(x: float) -> int:
    """floor(x + 0.5): the spec's rounding of ratios and averages (G5); Python's round() is banker's."""
    return math.floor(x + 0.5)


def layer_average(num_image: int, num_layers: int, stages: list[tuple[int, int]]) -> float:
    """Layer-average visual tokens for stages [(L_s, n_s)]: (L_1 * K + sum_s (L_{s+1} - L_s) * n_s) / T,
    L_{m+1} = T (§1, Budget rule); K without stages."""
    if not stages:
        return float(num_image)
    bounds = [layer for layer, _ in stages] + [num_layers]
    total = bounds[0] * num_image + sum((bounds[s + 1] - bounds[s]) * n for s, (_, n) in enumerate(stages))
    return total / num_layers


def keep_for_average(name: str, num_image: int, num_layers: int, layers: list[int], average: float) -> tuple[int, ...]:
    """Post-stage counts whose layer average is `average` (§1; Polymorphic §5.1 for several stages).

    One stage: K2 = round((T*B - L*K) / (T - L)). Several: n_s = round(K * rho^s), rho solved on the
    unrounded average by 60 bisection steps. An error when even keeping nothing after the first stage
    would exceed the average (e.g. B = 16 at L = 2 from K = 576 on 32 layers)."""
    layers, t, k = list(layers), num_layers, num_image
    if not layers or any(not 1 <= layer <= t - 1 for layer in layers) or layers != sorted(set(layers)):
        raise EdgepruneError(f"{name}: stage layers {layers}: expected increasing layers in 1..{t - 1}")
    if not 0 < average <= k:
        raise EdgepruneError(f"{name}: average={average}, expected 0 < average <= K={k}")

    def avg(rho: float) -> float:
        return layer_average(k, t, [(layer, k * rho ** (s + 1)) for s, layer in enumerate(layers)])

    if len(layers) == 1:
        counts = (half_up((t * average - layers[0] * k) / (t - layers[0])),)
    else:
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if avg(mid) < average else (lo, mid)
        counts = tuple(half_up(k * lo ** (s + 1)) for s in range(len(layers)))
    if counts[-1] < 1:
        raise EdgepruneError(f"{name}: a layer average of {average} visual tokens is impossible from K={k} with "
                             f"stages at L={layers} on T={t} layers (layers 0..{layers[0] - 1} alone average "
                             f"{layers[0] * k / t:.1f})")
    return counts


@dataclass(frozen=True)
class StagePlan:
    """The in-LLM stages of one bundle. stages: ((L, K_in, K_out), ...) in layer order."""

    method: str
    stages: tuple[tuple[int, int, int], ...]
    kv_policy: str
    image_start: int          # S: prefix tokens before the image
    num_layers: int           # T
    min_text_tokens: int = 0  # valid tokens a row needs after the image (DART's text pivots)

    def __post_init__(self):
        if self.kv_policy not in KV_POLICIES:
            raise BundleError(f"in-LLM stage kv_policy {self.kv_policy!r}; expected one of {', '.join(KV_POLICIES)}")

    @property
    def num_image(self) -> int:
        return self.stages[0][1]

    @property
    def num_kept(self) -> int:
        return self.stages[-1][2]

    @property
    def kv_groups(self) -> tuple[int, ...]:
        """First layer of each group of layers whose caches have one length (one decode mask each)."""
        return (0,) if self.kv_policy == "uniform" else (0, *(layer for layer, _, _ in self.stages))

    @property
    def layer_average(self) -> float:
        return layer_average(self.num_image, self.num_layers, [(layer, out) for layer, _, out in self.stages])

    def image_tokens_per_layer(self) -> list[int]:
        """Image tokens each layer's prefill runs on (its hidden states and, under faithful, its cache)."""
        counts, n = [], self.num_image
        for layer in range(self.num_layers):
            n = next((out for at, _, out in self.stages if at == layer), n)
            counts.append(n)
        return counts

    def kv_image_tokens_per_layer(self) -> list[int]:
        """Image tokens each layer's KV cache holds after the prefill (uniform: all gathered to K_final)."""
        if self.kv_policy == "uniform":
            return [self.num_kept] * self.num_layers
        return self.image_tokens_per_layer()

    def group_masks(self, prefill_mask: np.ndarray) -> list[np.ndarray]:
        """The prefill's mask [B, S + K + M] -> per KV group, the mask of what its caches hold after the
        prefill: the image span shortened to the group's count (image slots are all valid tokens)."""
        s, k = self.image_start, self.num_image
        counts = [self.num_kept] if self.kv_policy == "uniform" else [k] + [out for _, _, out in self.stages]
        b = prefill_mask.shape[0]
        return [np.concatenate([prefill_mask[:, :s], np.ones((b, n), prefill_mask.dtype), prefill_mask[:, s + k:]],
                               axis=1) for n in counts]

    def check_rows(self, prefix_len: int, text_lengths) -> None:
        """The prompt must put the image where the graph expects it, and leave each row enough text."""
        if prefix_len != self.image_start:
            raise EdgepruneError(f"the prompt puts the image after {prefix_len} tokens; this bundle's in-LLM stage "
                                 f"was exported for {self.image_start} (its chat template's prefix)")
        short = [(i, int(m)) for i, m in enumerate(text_lengths) if m < self.min_text_tokens]
        if short:
            raise EdgepruneError(f"{self.method}: row(s) {[i for i, _ in short]} have {[m for _, m in short]} text "
                                 f"token(s) after the image, expected >= {self.min_text_tokens} (its text pivots)")

    # -- manifest ----------------------------------------------------------------------------------------
    def to_manifest(self) -> dict:
        """The llm_stage.* entries (T is llm.num_layers, written by export_llm)."""
        return {Keys.LLM_STAGE_METHOD: self.method,
                Keys.LLM_STAGE_STAGES: [{Stage.LAYER: a, Stage.KEEP_IN: b, Stage.KEEP_OUT: c} for a, b, c in self.stages],
                Keys.LLM_STAGE_KV_POLICY: self.kv_policy, Keys.LLM_STAGE_IMAGE_START: self.image_start,
                Keys.LLM_STAGE_MIN_TEXT_TOKENS: self.min_text_tokens, Keys.LLM_STAGE_LAYER_AVERAGE: self.layer_average}

    @classmethod
    def from_manifest(cls, manifest: dict) -> "StagePlan | None":
        """The plan of a bundle (a manifest format.read returned), None when it has no in-LLM stage. The stage
        keys must agree with each other and with the prefill graph's presence."""
        method, stages = manifest[Keys.LLM_STAGE_METHOD], manifest[Keys.LLM_STAGE_STAGES]
        has_graph = manifest[Keys.LLM_PREFILL_GRAPH] is not None
        if method is None and not stages and not has_graph:
            return None
        if method is None or not stages or not has_graph:
            raise BundleError(f"manifest: in-LLM stage incomplete ({Keys.LLM_STAGE_METHOD}={method!r}, "
                              f"{len(stages)} {Keys.LLM_STAGE_STAGES}, {Keys.LLM_PREFILL_GRAPH} "
                              f"{'present' if has_graph else 'absent'}); expected all three or none")
        t = manifest[Keys.LLM_NUM_LAYERS]
        stages = tuple((s[Stage.LAYER], s[Stage.KEEP_IN], s[Stage.KEEP_OUT]) for s in stages)
        bad = [s for s in stages if not s[0] < t or s[2] > s[1]]
        chained = all(a[2] == b[1] and a[0] < b[0] for a, b in zip(stages, stages[1:]))
        if bad or not chained:
            raise BundleError(f"manifest: {Keys.LLM_STAGE_STAGES} {list(stages)}: expected layers increasing below "
                              f"{t} and each stage keeping <= what the previous one kept")
        try:
            return cls(method=method, stages=stages, kv_policy=manifest[Keys.LLM_STAGE_KV_POLICY],
                       image_start=manifest[Keys.LLM_STAGE_IMAGE_START], num_layers=t,
                       min_text_tokens=manifest[Keys.LLM_STAGE_MIN_TEXT_TOKENS])
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(f"manifest: in-LLM stage keys malformed ({err!r})") from None
