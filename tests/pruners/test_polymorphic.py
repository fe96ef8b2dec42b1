"""polymorphic (stage 1), one test per METHODS.md step, exact indices on hand-made inputs."""
from __future__ import annotations

import torch

from edgeprune.pruners import build
from edgeprune.pruners.dpc import dpc_merge
from edgeprune.pruners.polymorphic import split_budget
from tests.conftest import make_signals


def top_attn(attn, k):
    return torch.sort(attn, descending=True, stable=True).indices[:k].tolist()


def test_split_54_plus_10_at_64():
    assert split_budget(64) == (54, 10)
    assert split_budget(320) == (270, 50)
    assert split_budget(2) == (1, 1)
    assert split_budget(1) == (0, 1)          # K = 1: one cluster of every token
    pruner = build("polymorphic", keep=64)
    assert (pruner.dominant_count, pruner.cluster_count) == (54, 10)


def test_dominant_tokens_pass_through_unchanged_at_64():
    s = make_signals(batch=1, grid=(24, 24), seed=4)
    sel = build("polymorphic", keep=64)(feats=s["feats"], attn=s["attn"])
    top = top_attn(s["attn"][0], 54)
    positions = sel.positions[0].tolist()
    assert set(top) <= set(positions) and len(positions) == 64
    at = [positions.index(i) for i in top]
    assert torch.equal(sel.tokens[0, at], s["feats"][0, top])


def test_single_cluster_is_the_mean_of_the_others_at_the_densest():
    # keep = 7: Kk = 6, Kc = 1, so k = 1 and every rho is 1: the first non-dominant token is the
    # densest (ties to the lowest index) and the only centre; all the others join it.
    n = 16
    feats = torch.randn(1, n, 4, generator=torch.Generator().manual_seed(0))
    attn = torch.zeros(1, n)
    dominant = [0, 2, 3, 9, 10, 15]
    attn[0, dominant] = torch.arange(1.0, 7.0)
    sel = build("polymorphic", keep=7)(feats=feats, attn=attn)
    others = [i for i in range(n) if i not in dominant]
    assert sel.positions.tolist() == [[0, 1, 2, 3, 9, 10, 15]]
    assert torch.equal(sel.tokens[0, [0, 2, 3, 4, 5, 6]], feats[0, dominant])
    torch.testing.assert_close(sel.tokens[0, 1], feats[0, others].mean(dim=0))


def test_clusters_are_dpc_over_the_other_tokens_only():
    s = make_signals(batch=2, grid=(5, 8), seed=7)                         # N = 40
    sel = build("polymorphic", keep=20)(feats=s["feats"], attn=s["attn"])  # Kk = 17, Kc = 3
    for b in range(2):
        top = top_attn(s["attn"][b], 17)
        others = [i for i in range(40) if i not in set(top)]
        merged, centres, _ = dpc_merge(s["feats"][b:b + 1, others], keep=3)
        centre_positions = [others[c] for c in centres[0].tolist()]
        positions = sel.positions[b].tolist()
        assert positions == sorted(top + centre_positions)
        at = [positions.index(c) for c in centre_positions]
        torch.testing.assert_close(sel.tokens[b, at], merged[0])


def test_keep_one_is_one_cluster_of_every_token():
    s = make_signals(batch=2, grid=(3, 4), seed=3)
    sel = build("polymorphic", keep=1)(feats=s["feats"], attn=s["attn"])
    assert sel.positions.tolist() == [[0], [0]]                            # k = 1: all rho tie, token 0 densest
    torch.testing.assert_close(sel.tokens[:, 0], s["feats"].mean(dim=1))
