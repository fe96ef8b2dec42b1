"""AD-BTS: a parameter-free routing gate between token fusion and a selection method (METHODS.md, AD-BTS).

The gate measures spatial information density on the input image: S_flat is the fraction of pixels
whose grayscale gradient |dI/du| + |dI/dv| is below tau. Structure-sparse images (S_flat > threshold)
go to the fusion branch (K anchors by `attn`, each replaced by a softmax-weighted average of all
tokens), the others to a configurable selection method (default DivPrune). Both branches run and
`Where` picks per row, so the graph stays static. Differences from the paper, as METHODS.md says:
the fusion weights are the parameter-free softmax(a.x / sqrt(D)) instead of the paper's LoRA-trained
cross-attention, and the gate value is returned as an extra output ("gate") for logging.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from edgeprune.errors import PrunerConfigError
from edgeprune.pruners._registry import available, build, register_pruner
from edgeprune.pruners.base import Pruner, Selection
from edgeprune.pruners.ops import gather_rows, index_matrix, sort_by_position, topk_indices

__all__ = ["ADBTS"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
GRAY = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights for R, G, B


def _three_floats(name: str, value, positive: bool = False) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or (positive and min(out) <= 0):
        what = "3 positive floats" if positive else "3 floats"
        raise PrunerConfigError(f"adbts: {name}={value!r}, expected {what} (one per RGB channel)")
    return out  # type: ignore[return-value]


@register_pruner("adbts")
class ADBTS(Pruner):
    """AD-BTS: gradient gate routes flat images to attention-anchored fusion, others to a selection method."""

    # Class-level: what every AD-BTS needs. An instance adds its selection method's signals (see __init__).
    requires = ("tokens", "attn", "pixels")
    extra_outputs = ("gate",)

    def __init__(self, keep: int, tau: float = 0.05, threshold: float = 0.9, selection: str = "divprune",
                 selection_options: dict | None = None, pixel_mean: tuple = CLIP_MEAN, pixel_std: tuple = CLIP_STD):
        super().__init__(keep)
        if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not tau > 0:
            raise PrunerConfigError(f"adbts: tau={tau!r}, expected a float > 0 (gradient L1 norm in [0, 2])")
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 <= threshold <= 1:
            raise PrunerConfigError(f"adbts: threshold={threshold!r}, expected a float in [0, 1] "
                                    f"(a fraction of pixels)")
        if selection == "adbts":
            raise PrunerConfigError("adbts: selection='adbts', expected another method (it would nest itself)")
        methods = available()
        if selection not in methods:
            raise PrunerConfigError(f"adbts: selection={selection!r} is not a pruner; available: "
                                    f"{', '.join(m for m in methods if m != 'adbts')}")
        if methods[selection].space != "tokens":
            raise PrunerConfigError(
                f"adbts: selection={selection!r} outputs '{methods[selection].space}'-space tokens, expected a "
                f"method whose output is in 'tokens' space (the fusion branch is, and Where needs one space)")
        if selection_options is not None and not isinstance(selection_options, dict):
            raise PrunerConfigError(f"adbts: selection_options={selection_options!r}, expected a dict or None")
        self.tau = float(tau)
        self.threshold = float(threshold)
        self.selection = selection
        self.pixel_mean = _three_floats("pixel_mean", pixel_mean)
        self.pixel_std = _three_floats("pixel_std", pixel_std, positive=True)
        self.selector = build(selection, keep=keep, **(selection_options or {}))
        # The instance needs the selection method's signals too (e.g. grid for uniform); the base
        # class and the graph wrapper read self.requires, so this per-instance tuple drives both.
        extra = tuple(s for s in self.selector.requires if s not in ADBTS.requires)
        self.requires = ADBTS.requires + extra

    # -- the gate -------------------------------------------------------------------------------------
    def gradient(self, pixels: Tensor) -> Tensor:                     # [B, 3, h, w] -> [B, h, w]
        """|dI/du| + |dI/dv| of the de-normalised grayscale image, forward differences, 0 at the last row/column."""
        x = pixels.float()  # the gate is float32 whatever the graph's precision (S_flat counts threshold hits)
        # 1. undo the model's normalisation, channel by channel, as explicit elementwise ops so that
        #    torch and ONNX Runtime round identically (a ReduceSum over channels might not).
        (mr, mg, mb), (sr, sg, sb) = self.pixel_mean, self.pixel_std
        r = x[:, 0] * sr + mr                                          # [B, h, w] in [0, 1] for a real image
        g = x[:, 1] * sg + mg
        b = x[:, 2] * sb + mb
        # 2. grayscale. Pixels arrive already resized to the model's input size (METHODS.md's "after
        #    resizing"); no clamping, so the gate sees exactly the image the encoder sees.
        gray = r * GRAY[0] + g * GRAY[1] + b * GRAY[2]                 # [B, h, w]
        # 3. forward differences, padded with a zero last column / row
        du = F.pad((gray[:, :, 1:] - gray[:, :, :-1]).abs(), (0, 1, 0, 0))  # [B, h, w]
        dv = F.pad((gray[:, 1:, :] - gray[:, :-1, :]).abs(), (0, 0, 0, 1))  # [B, h, w]
        return du + dv

    def gate(self, pixels: Tensor) -> Tensor:                         # [B, 3, h, w] -> [B] float32
        """S_flat: the fraction of pixels whose gradient L1 norm is below tau."""
        return (self.gradient(pixels) < self.tau).float().mean(dim=(1, 2))

    # -- the fusion branch ------------------------------------------------------------------------------
    def fuse(self, tokens: Tensor, attn: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # [B, N, D], [B, N]
        """K anchors by attn, each replaced by softmax(a.x_j / sqrt(D))-weighted mean of all tokens.
        Returns (positions [B, K], fused tokens [B, K, D], their weights [B, K, N]) by position."""
        anchors = topk_indices(attn, self.keep)                        # [B, K]
        a = gather_rows(tokens, anchors)                               # [B, K, D]
        logits = a @ tokens.transpose(1, 2) / math.sqrt(tokens.shape[-1])  # [B, K, N], anchor itself included
        weights = torch.softmax(logits, dim=-1)                        # [B, K, N]
        fused = weights @ tokens                                       # [B, K, D], convex: scale stays a token's
        return sort_by_position(anchors, fused, weights)

    def select(self, tokens: Tensor, attn: Tensor, pixels: Tensor, feats: Tensor | None = None,
               keys: Tensor | None = None, grid: tuple[int, int] | None = None) -> Selection:
        # feats / keys / grid arrive only when the selection method requires them
        s_flat = self.gate(pixels)                                     # [B]
        # fusion branch (structure-sparse rows)
        f_pos, f_tok, f_weights = self.fuse(tokens, attn)              # [B, K], [B, K, D], [B, K, N]
        # selection branch (the configured method, given exactly its own signals)
        given = {"tokens": tokens, "attn": attn, "pixels": pixels, "feats": feats, "keys": keys, "grid": grid}
        sel = self.selector(**{s: given[s] for s in self.selector.requires})
        s_weights = sel.weights if sel.weights is not None else index_matrix(sel.positions, tokens.shape[1], tokens.dtype)
        s_pos, s_tok, s_weights = sort_by_position(sel.positions, sel.tokens, s_weights)  # already ascending
        # route per row: both branches are computed, Where picks (no control flow on tensor values)
        fusion = s_flat > self.threshold                               # [B] bool
        tokens_out = torch.where(fusion[:, None, None], f_tok, s_tok)
        positions = torch.where(fusion[:, None], f_pos, s_pos)
        weights = torch.where(fusion[:, None, None], f_weights, s_weights)
        return Selection(tokens=tokens_out, positions=positions, extras={"gate": s_flat}, weights=weights)

    def identity(self, **signals) -> Selection:
        """keep == N: every token, in order, plus the gate (the route is still logged)."""
        out = super().identity(**signals)
        return Selection(tokens=out.tokens, positions=out.positions, extras={"gate": self.gate(signals["pixels"])})

    def extra_repr(self) -> str:
        return f"keep={self.keep}, tau={self.tau}, threshold={self.threshold}, selection={self.selection!r}"
