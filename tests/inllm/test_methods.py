"""In-LLM methods on hand-made layer signals (METHODS_INLLM.md §2-§6): exact kept slots per spec step."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edgeprune.errors import PrunerConfigError
from edgeprune.inllm import Stage, StageSignals, build
from edgeprune.inllm.polymorphic import rater_scores
from edgeprune.pruners import build as build_pruner
from edgeprune.pruners.polymorphic import Polymorphic


def unit(*angles: float, magnitude: float = 1.0) -> torch.Tensor:
    """Angles in degrees -> 2-D vectors [1, n, 2] (cosine similarity depends on the angles only)."""
    return torch.tensor([[[magnitude * math.cos(math.radians(a)), magnitude * math.sin(math.radians(a))]
                          for a in angles]], dtype=torch.float32)


def keys_with_norms(*norms: float) -> torch.Tensor:
    """[1, Hkv=2, n, 2] keys whose L1 norm over KV heads and head dim is `norms[i]` (split over the two heads)."""
    k = torch.zeros(1, 2, len(norms), 2)
    for i, v in enumerate(norms):
        k[0, 0, i, 0], k[0, 1, i, 1] = v / 2, -v / 2   # signs must not matter: L1
    return k


def kept(name: str, signals: StageSignals, n: int, k2: int, **cfg) -> list[int]:
    stage = build(name, keep=k2, layer=2, **cfg)
    return sorted(stage.select(signals, Stage(layer=2, num_in=n, num_out=k2)).keep[0].tolist())


# -- FastV / PyramidDrop -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fastv", "pdrop"])
def test_last_token_attention_top_k_with_ties_to_the_lowest_slot(name):
    attn = torch.tensor([[0.10, 0.30, 0.30, 0.05, 0.20, 0.05]])
    signals = StageSignals(text_mask=torch.ones(1, 3, dtype=torch.bool), last_attn=attn)
    assert kept(name, signals, 6, 2) == [1, 2]
    assert kept(name, signals, 6, 3) == [1, 2, 4]
    assert kept(name, signals, 6, 5) == [0, 1, 2, 3, 4]      # 3 and 5 tie at 0.05: the lower slot


def test_fastv_default_keeps_half_and_pdrop_halves_three_times():
    assert [s.num_out for s in build("fastv").bind(576, 32)] == [288]
    assert [(s.layer, s.num_in, s.num_out) for s in build("pdrop").bind(576, 32)] == \
        [(8, 576, 288), (16, 288, 144), (24, 144, 72)]
    from edgeprune.runtime.stages import layer_average
    assert layer_average(576, 32, [(8, 288), (16, 144), (24, 72)]) == 270.0     # §6


# -- DART ---------------------------------------------------------------------------------------------------
# 10 image slots; slot 3 has the largest key norm (the image pivot, at 0 deg); text token 0 is the text
# pivot (90 deg); text token 2 is padding with the largest norm of all and must be ignored.
IMAGE_ANGLES = (180, 170, 95, 0, 100, 260, 45, 200, 10, 275)


def dart_signals() -> StageSignals:
    return StageSignals(text_mask=torch.tensor([[True, True, False]]),
                        image_hidden=unit(*IMAGE_ANGLES), text_hidden=unit(90, 0, 180),
                        image_keys=keys_with_norms(1, 2, 1, 9, 1, 1, 3, 1, 1, 1), text_keys=keys_with_norms(5, 1, 100))


def test_dart_pivots_quotas_and_order_pin_the_kept_slots():
    # K2 = 4, P_img = P_txt = 1: R = 3 over 2 pivots -> quotas [2, 1]. The image pivot (slot 3, 0 deg) takes
    # its 2 least similar slots, 0 (180) and 1 (170); the text pivot (90 deg) then takes 9 (275, cos -0.996).
    # Text pivot first would give {3, 9, 5, 0}; padding as the text pivot (180) would take slot 8.
    assert kept("dart", dart_signals(), 10, 4, image_pivots=1, text_pivots=1, features="raw") == [0, 1, 3, 9]


def test_dart_exactly_k2_image_pivots_kept_text_pivots_only_guide():
    s = dart_signals()
    for k2 in range(1, 11):
        got = kept("dart", s, 10, k2, image_pivots=1, text_pivots=1, features="raw")
        assert len(got) == k2 and len(set(got)) == k2 and 3 in got and all(0 <= i < 10 for i in got)


def test_dart_quota_remainder_goes_to_the_first_pivots():
    # Two image pivots (slots 3 and 6: norms 9 and 3), no text pivot, K2 = 5: R = 3 -> quotas [2, 1].
    # Slot 3 (0 deg) takes 0 (180) and 1 (170); slot 6 (45 deg) then takes 7 (200: cos 155 deg = -0.91).
    # Quotas [1, 2] would give slot 3 only 0, and slot 6 both 7 and 5 (260: cos 215 deg = -0.82).
    assert kept("dart", dart_signals(), 10, 5, image_pivots=2, text_pivots=0, features="raw") == [0, 1, 3, 6, 7]


def official_dart(signals: StageSignals, k2: int, p_img: int = 4, p_txt: int = 4) -> set[int]:
    """The official loop (modeling_llama_self.py): quota K2 // 8 per pivot, pivots in our order, image pivots
    kept on top, text pivots dropped."""
    k_img = signals.image_keys.abs().sum(dim=(1, 3))[0]
    k_txt = torch.where(signals.text_mask[0], signals.text_keys.abs().sum(dim=(1, 3))[0], torch.tensor(-1e30))
    img_piv = torch.sort(k_img, descending=True, stable=True).indices[:p_img].tolist()
    txt_piv = torch.sort(k_txt, descending=True, stable=True).indices[:p_txt].tolist()
    x = signals.image_hidden[0] / signals.image_hidden[0].norm(dim=-1, keepdim=True)
    t = signals.text_hidden[0] / signals.text_hidden[0].norm(dim=-1, keepdim=True)
    pool = [i for i in range(x.shape[0]) if i not in img_piv]
    keep = set(img_piv)
    for p in [x[i] for i in img_piv] + [t[j] for j in txt_piv]:
        order = sorted(pool, key=lambda i: (float(x[i] @ p), i))[:k2 // 8]
        keep |= set(order)
        pool = [i for i in pool if i not in order]
    return keep


def test_dart_matches_the_official_loop_where_budgets_coincide():
    # At K2 = 4 + 8q the official loop's 4 + 8 * floor(K2 / 8) is exactly K2 and our quotas are its q each.
    g = torch.Generator().manual_seed(0)
    n, m = 96, 12
    s = StageSignals(text_mask=torch.ones(1, m, dtype=torch.bool), image_hidden=torch.randn(1, n, 16, generator=g),
                     text_hidden=torch.randn(1, m, 16, generator=g), image_keys=torch.randn(1, 2, n, 8, generator=g),
                     text_keys=torch.randn(1, 2, m, 8, generator=g))
    for k2 in (20, 36, 68):
        ours = set(kept("dart", s, n, k2, features="raw"))
        assert ours == official_dart(s, k2) and len(ours) == 4 + 8 * (k2 // 8)
    # elsewhere the official loop keeps 4 + 8 * floor(K2 / 8) (68 for K2 = 64), we keep exactly K2
    assert len(official_dart(s, 64)) == 68 and len(kept("dart", s, n, 64, features="raw")) == 64


def test_dart_bounds_are_errors_naming_the_values():
    with pytest.raises(PrunerConfigError, match=r"dart: stage 1 L=2, K=576 -> K2=3, T=30: expected K2 >= 4"):
        build("dart", keep=3, layer=2).bind(576, 30)
    with pytest.raises(PrunerConfigError, match="image_pivots=-1"):
        build("dart", keep=64, image_pivots=-1)
    with pytest.raises(PrunerConfigError, match="features='norm'"):
        build("dart", keep=64, features="norm")


# -- D2Pruner -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha,bias", [(1.0, None), (0.5, None), (0.0, "prior"), (0.5, "prior")])
def test_d2pruner_in_llm_equals_the_pre_llm_port_on_the_same_tensors(alpha, bias):
    g = torch.Generator().manual_seed(3)
    grid, b, k2 = (6, 7), 2, 12
    n = grid[0] * grid[1]
    hidden, attn = torch.randn(b, n, 8, generator=g), torch.rand(b, n, generator=g)
    prior = torch.rand(n, generator=g) + 0.1 if bias else None
    signals = StageSignals(text_mask=torch.ones(b, 2, dtype=torch.bool), image_hidden=hidden, last_attn=attn,
                           positions=torch.arange(n).expand(b, n), grid=grid)
    stage = build("d2pruner", keep=k2, layer=2, alpha=alpha, bias=prior)
    ours = torch.sort(stage.select(signals, Stage(2, n, k2)).keep, dim=1).values
    port = build_pruner("d2pruner", keep=k2, alpha=alpha, bias=prior)(tokens=hidden, attn=attn, grid=grid)
    assert torch.equal(ours, port.positions)


def test_d2pruner_reads_the_prior_and_the_grid_at_each_slots_original_position():
    # After a pre-LLM pruner the n slots sit at grid positions `pos`: the stage on them equals the pre-LLM port on
    # the full grid restricted to those cells (prior and adjacency by original (row, col)).
    g = torch.Generator().manual_seed(5)
    grid, n, k2 = (5, 6), 11, 5
    pos = torch.sort(torch.randperm(30, generator=g)[:n]).values
    hidden, attn, prior = torch.randn(1, n, 8, generator=g), torch.rand(1, n, generator=g), torch.rand(30, generator=g)
    stage = build("d2pruner", keep=k2, alpha=0.5, theta=0.55, bias=prior)
    got = stage.select(StageSignals(text_mask=torch.ones(1, 1, dtype=torch.bool), image_hidden=hidden, last_attn=attn,
                                    positions=pos.unsqueeze(0), grid=grid), Stage(2, n, k2)).keep
    # the same selection by hand: importance and Chebyshev-1 adjacency on the original cells
    from edgeprune.pruners.d2pruner import diverse_select
    rows, cols = pos // 6, pos % 6
    ref = diverse_select(hidden, attn / (prior[pos] + 1e-7), rows, cols, keep=k2, num_pivots=3, alpha=0.5, theta=0.55)
    assert torch.equal(got, ref)
    shifted = diverse_select(hidden, attn / (prior[:n] + 1e-7), torch.arange(n) // 6, torch.arange(n) % 6, keep=k2,
                             num_pivots=3, alpha=0.5, theta=0.55)
    assert not torch.equal(got, shifted), "the test needs inputs where slot index != grid position matters"


# -- Polymorphic stage 2 --------------------------------------------------------------------------------------
def reference_alpha(v: np.ndarray, t: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Eq. 9-11 in plain numpy for one row: softmax over the valid text, raters s_j > mean s, alpha."""
    t = t[valid]
    logits = v @ t.T / math.sqrt(v.shape[1])
    mx = np.exp(logits - logits.max(axis=1, keepdims=True))
    mx /= mx.sum(axis=1, keepdims=True)
    s = mx.mean(axis=0)
    raters = s > s.mean()
    if not raters.any():
        raters[:] = True
    return mx[:, raters].mean(axis=1)


def test_polymorphic_rater_scores_match_the_paper_equations_with_padding_ignored():
    g = torch.Generator().manual_seed(1)
    v, t = torch.randn(2, 9, 6, generator=g), torch.randn(2, 5, 6, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    alpha = rater_scores(v, t, mask)
    for b in range(2):
        np.testing.assert_allclose(alpha[b].numpy(), reference_alpha(v[b].numpy(), t[b].numpy(), mask[b].numpy()),
                                   rtol=1e-5)


def test_polymorphic_mean_rater_score_is_one_over_the_text_length():
    # Y4: every row of Mx sums to 1 over the M_b valid text tokens, so s-bar = 1 / M_b exactly (in exact
    # arithmetic); the graph compares s_j * M_b > 1 instead of computing s-bar.
    g = torch.Generator().manual_seed(2)
    v, t = torch.randn(1, 7, 4, generator=g), torch.randn(1, 6, 4, generator=g)
    mask = torch.tensor([[True] * 4 + [False] * 2])
    mx = torch.softmax(torch.where(mask.unsqueeze(1), v @ t.transpose(1, 2) / 2.0, torch.tensor(-1e30)), dim=-1)
    s = mx.mean(dim=1)[0, :4]
    assert s.mean().item() == pytest.approx(1 / 4, abs=1e-7)


def test_polymorphic_raters_are_strictly_above_the_mean():
    """§5 2c: raters are s_j > 1/M_b, strict. Saturated logits make Mx exact one-hot rows, so s_j * M_b is exact:
    (1, 2, 1, 0) over the 4 valid text tokens (the fifth is padding). Strict: the one rater is text token 1, alpha
    = (0, 1, 1, 0), kept {1, 2}. With >= tokens 0 and 2 (exactly at the mean) would rate too: alpha = 1/3 for
    every image token, and the tie would keep {0, 1}."""
    text = 100.0 * torch.eye(5)[None]                                       # [1, M=5, D=5], text token j = 100 e_j
    image = 100.0 * torch.eye(5)[[0, 1, 1, 2]][None]                        # image token i points at text 0, 1, 1, 2
    mask = torch.tensor([[True, True, True, True, False]])
    mx = torch.softmax(torch.where(mask.unsqueeze(1), image @ text.transpose(1, 2) / 5 ** 0.5,
                                   torch.tensor(-1e30)), dim=-1)
    assert torch.equal(mx.mean(dim=1)[0, :4] * 4, torch.tensor([1.0, 2.0, 1.0, 0.0]))   # exact: two at the mean
    assert torch.equal(rater_scores(image, text, mask), torch.tensor([[0.0, 1.0, 1.0, 0.0]]))
    signals = StageSignals(text_mask=mask, text_hidden=text, image_hidden=image)
    got = build("polymorphic", keep=2, layer=3, merge_pruned=False).select(signals, Stage(3, 4, 2))
    assert sorted(got.keep[0].tolist()) == [1, 2]


def test_polymorphic_without_merge_is_top_k_by_alpha():
    g = torch.Generator().manual_seed(4)
    signals = StageSignals(text_mask=torch.ones(1, 4, dtype=torch.bool), text_hidden=torch.randn(1, 4, 6, generator=g),
                           image_hidden=torch.randn(1, 20, 6, generator=g))
    alpha = rater_scores(signals.image_hidden, signals.text_hidden, signals.text_mask)
    got = build("polymorphic", keep=7, layer=3, merge_pruned=False).select(signals, Stage(3, 20, 7))
    assert got.hidden is None
    top = torch.sort(alpha[0], descending=True, stable=True).indices[:7]
    assert sorted(got.keep[0].tolist()) == sorted(top.tolist())


def test_polymorphic_merges_the_pruned_into_clusters_at_their_centres():
    g = torch.Generator().manual_seed(6)
    signals = StageSignals(text_mask=torch.ones(1, 4, dtype=torch.bool), text_hidden=torch.randn(1, 4, 6, generator=g),
                           image_hidden=torch.randn(1, 30, 6, generator=g))
    got = build("polymorphic", keep=13, layer=3).select(signals, Stage(3, 30, 13))
    alpha = rater_scores(signals.image_hidden, signals.text_hidden, signals.text_mask)
    stage1 = Polymorphic(keep=13).select(feats=signals.image_hidden, attn=alpha)   # c = 13 - round(13 * 5.4 / 6.4) = 2
    assert torch.equal(got.keep, stage1.positions) and torch.equal(got.hidden, stage1.tokens)
    dominant = set(torch.sort(alpha[0], descending=True, stable=True).indices[:11].tolist())
    merged = [i for i, slot in enumerate(got.keep[0].tolist()) if slot not in dominant]
    assert len(merged) == 2
    for i in merged:   # a merged state is not the centre's own state (its cluster has other members here)
        assert not torch.equal(got.hidden[0, i], signals.image_hidden[0, got.keep[0, i]])


@pytest.mark.parametrize("t,layers", [(32, (3, 7, 16)), (40, (3, 7, 16)), (28, (3, 7, 13)), (30, (3, 7, 16))])
def test_polymorphic_schedule_average_within_half_a_token_of_the_budget(t, layers):
    from edgeprune.inllm import keep_for_average, layer_average
    for budget in (16, 32, 64, 100, 128, 192):
        counts = keep_for_average("polymorphic", 2 * budget, t, list(layers), budget)
        assert abs(layer_average(2 * budget, t, list(zip(layers, counts))) - budget) <= 0.5 + 1e-9
