"""dpc (DPC-KNN merge), one test per METHODS.md step, exact values on hand-made inputs.

Coordinates are small multiples of 1/8 and C is 1 or 4 (1/sqrt(C) = 1/2 is exact), so every
distance below is computed without rounding and ties are exact.
"""
from __future__ import annotations

import math

import pytest
import torch

from edgeprune.errors import PrunerConfigError
from edgeprune.pruners import build
from edgeprune.pruners.dpc import dpc_density_delta, dpc_merge, knn_k

LINE = torch.tensor([[[0.0], [1.0], [3.0], [7.0], [15.0]]])                # C = 1, so D = |xi - xj|


def plane(points):
    """2-D points as [1, N, 4] feats (two zero channels): D = ||pi - pj|| / 2."""
    return torch.tensor([[[x, y, 0.0, 0.0] for x, y in points]])


def test_distances_are_scaled_by_sqrt_c():
    feats = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [4.0, 2.0, 2.0, 1.0]]])   # ||d|| = 5, C = 4
    _, delta, _ = dpc_density_delta(feats, k=1)
    assert delta.tolist() == [[2.5, 2.5]]                                  # 5 / sqrt(4)


@pytest.mark.parametrize("keep,k", [(64, 5), (5, 5), (6, 5), (4, 2), (3, 1), (2, 1), (1, 1)])
def test_step1_k_rule_for_small_keep(keep, k):
    assert knn_k(5, keep) == k                                             # min(3, max(K // 2, 1)) when 5 > K


def test_step1_density_mean_sq_distance_of_k_nearest_self_included():
    rho, _, _ = dpc_density_delta(LINE, k=knn_k(5, 4))                    # k = 2: self (0) + nearest
    expected = [math.exp(-(0 + d * d) / 2) for d in (1, 1, 2, 4, 8)]
    torch.testing.assert_close(rho[0], torch.tensor(expected))
    rho5, _, _ = dpc_density_delta(torch.cat([LINE, torch.tensor([[[16.0]]])], dim=1), k=knn_k(5, 5))
    # token 0: 0, 1, 3, 7, 15 -> squares 0, 1, 9, 49, 225
    torch.testing.assert_close(rho5[0, 0], torch.tensor(math.exp(-(0 + 1 + 9 + 49 + 225) / 5)))


def test_step2_delta_nearest_denser_and_densest_gets_max_d():
    _, delta, _ = dpc_density_delta(LINE, k=2)
    # rho: tokens 0 and 1 tie (nearest at 1); the lower index is the denser, so token 0 is the
    # densest and gets max(D) = 15; token 1 -> token 0: 1; 2 -> 1: 2; 3 -> 2: 4; 4 -> 3: 8.
    assert delta.tolist() == [[15.0, 1.0, 2.0, 4.0, 8.0]]


def test_step2_exact_duplicates_only_the_first_copy_is_a_peak():
    feats = plane([[1.0, 2.0], [5.0, 5.0], [1.0, 2.0], [1.0, 2.0]])
    _, delta, _ = dpc_density_delta(feats, k=2)
    # the copies tie in rho; the first is the densest: max(D) = 5 / 2; the others have a denser
    # copy at distance 0; token 1 is less dense than all copies.
    assert delta.tolist() == [[2.5, 2.5, 0.0, 0.0]]


def test_step3_two_obvious_clusters():
    a = [[0.75, 0.0], [0.0, 0.0], [0.0, 0.25], [-0.5, 0.0]]                # hub (0, 0)
    b = [[8.0, 8.0], [8.0, 8.625], [9.0, 8.0], [7.125, 8.0]]               # hub (8, 8), looser
    feats = plane([a[0], b[0], a[1], b[1], a[2], b[2], a[3], b[3]])     # interleaved positions
    merged, centres, _ = dpc_merge(feats, keep=2, k_neighbors=2)
    # Densest: A's hub (position 2, tied with its neighbour at 4, lower index wins); B's hub
    # (position 1) is far from every denser token: the two largest rho * delta.
    assert centres.tolist() == [[1, 2]]
    torch.testing.assert_close(merged[0, 0], plane(b)[0].mean(dim=0))
    torch.testing.assert_close(merged[0, 1], plane(a)[0].mean(dim=0))
    sel = build("dpc", keep=2, k_neighbors=2)(feats=feats)
    assert torch.equal(sel.positions, centres) and torch.equal(sel.tokens, merged)


def test_step3_a_centre_joins_its_own_cluster_even_at_distance_zero():
    a, b = [1.0, 2.0], [6.0, 2.0]
    feats = plane([a, a, a, b])
    # keep = 3: centres 0 (densest), 3 (far) and 1 (score 0, lowest index). Token 1 is as near to
    # centre 0 as to itself; it must stay in its own cluster, else that cluster is empty (0 / 0).
    merged, centres, _ = dpc_merge(feats, keep=3)
    assert centres.tolist() == [[0, 1, 3]]
    assert torch.equal(merged, plane([a, a, b]))


def test_bad_k_neighbors_is_clear_error():
    with pytest.raises(PrunerConfigError, match=r"dpc: k_neighbors=0, expected an integer >= 1"):
        build("dpc", keep=4, k_neighbors=0)
