"""DART at layer L (the in-LLM original): 4 image + 4 text pivots by layer L-1 key norm, each takes its
quota of the image tokens least similar to it (METHODS_INLLM.md §3).

Steps as the spec numbers them; where it departs from the official code:
- exactly K2 tokens are kept (D5): R = K2 - P_img split over the P = P_img + P_txt pivots, the first
  R mod P one more (the code keeps P_img + 8 * floor(K2 / 8));
- pivot order is image pivots then text pivots, each by descending key norm (D6), not Python set order;
- key L1 norms are over the Hkv KV heads (D7; the code's repeated heads give the same ranking).
Options: `features` "final_norm" (the code, D3) or "raw" h^(L-1); `image_pivots` / `text_pivots`
(4 / 4; visual-only 8 / 0 and text-only 0 / 8 are the paper's Fig. 7 variants).
"""
from __future__ import annotations

import torch

from edgeprune.errors import PrunerConfigError
from edgeprune.inllm._registry import register_stage
from edgeprune.inllm.base import LLMStage, Stage, StageChoice, StageSignals
from edgeprune.pruners.dart import pivot_quotas
from edgeprune.pruners.ops import NEG_INF, cosine_matrix, gather_rows, one_hot, topk_indices

__all__ = ["Dart"]

FEATURES = ("final_norm", "raw")


@register_stage("dart")
class Dart(LLMStage):
    """DART: image + text pivots by layer L-1 key norm; each keeps its quota of the least similar image tokens."""

    requires = ("hidden", "keys")
    default_layers = (2,)

    def __init__(self, keep=None, layer=None, image_pivots: int = 4, text_pivots: int = 4,
                 features: str = "final_norm"):
        super().__init__(keep, layer)
        for option, value in (("image_pivots", image_pivots), ("text_pivots", text_pivots)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PrunerConfigError(f"dart: {option}={value!r}, expected an integer >= 0")
        if image_pivots + text_pivots < 1:
            raise PrunerConfigError("dart: image_pivots + text_pivots = 0, expected at least one pivot")
        if features not in FEATURES:
            raise PrunerConfigError(f"dart: features={features!r}, expected one of {', '.join(FEATURES)}")
        self.image_pivots, self.text_pivots, self.features = image_pivots, text_pivots, features
        self.min_text_tokens = text_pivots   # D8: a row needs M_b >= P_txt

    def min_keep(self) -> int:
        return max(1, self.image_pivots)

    def min_keep_reason(self) -> str:
        return f"the {self.image_pivots} image pivots are kept"

    def select(self, signals: StageSignals, stage: Stage) -> StageChoice:
        n, p_img, p_txt = stage.num_in, self.image_pivots, self.text_pivots
        masked = torch.tensor(NEG_INF)

        # 1. pivot scores: L1 norm of the post-RoPE keys over KV heads and head dim; padding text -inf
        k_img = signals.image_keys.abs().sum(dim=(1, 3))                           # [B, n]
        k_txt = torch.where(signals.text_mask, signals.text_keys.abs().sum(dim=(1, 3)), masked)  # [B, M]

        # 2. pivots: the largest norms, descending (ties to the lowest index)
        x_img, x_txt = signals.image_hidden, signals.text_hidden                   # [B, n, D], [B, M, D]
        pivot_feats, kept, chosen = [], torch.zeros_like(k_img, dtype=torch.bool), []
        if p_img:
            img_pivots = topk_indices(k_img, p_img)                                 # [B, P_img]
            pivot_feats.append(gather_rows(x_img, img_pivots))
            kept = one_hot(img_pivots, n)                                           # [B, n]
            chosen.append(img_pivots)
        if p_txt:
            pivot_feats.append(gather_rows(x_txt, topk_indices(k_txt, p_txt)))    # [B, P_txt, D]

        # 3. similarity features: RMSNorm_final(h) (the code) or h itself
        feats = torch.cat(pivot_feats, dim=1)                                       # [B, P, D]
        if self.features == "final_norm":
            x_img, feats = signals.final_norm(x_img).float(), signals.final_norm(feats).float()
        sim = cosine_matrix(feats, x_img)                                           # [B, P, n]

        # 4.-6. each pivot in order takes its quota of the least similar image slots still in the pool
        #    (R = K2 - P_img over the P = P_img + P_txt pivots: pivot_quotas splits keep - pivots = R)
        for i, quota in enumerate(pivot_quotas(stage.num_out + p_txt, p_img + p_txt)):
            if quota == 0:
                continue
            taken = topk_indices(torch.where(kept, masked, -sim[:, i]), quota)     # [B, quota]
            kept = kept | one_hot(taken, n)
            chosen.append(taken)

        # 7. sel = image pivots + everything taken: exactly K2 (text pivots are text and stay anyway)
        return StageChoice(keep=torch.cat(chosen, dim=1))                          # [B, K2]

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, image_pivots={self.image_pivots}, text_pivots={self.text_pivots}, "
                f"features={self.features}")
