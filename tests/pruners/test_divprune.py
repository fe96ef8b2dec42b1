"""DivPrune (METHODS.md, DivPrune): one test per spec step, exact indices on hand-made 2-D tokens,
and the O(K*N) running minimum against a naive O(K^2*N) reference."""
from __future__ import annotations

import math

import pytest
import torch

from edgeprune.pruners import build
from edgeprune.pruners.divprune import max_min_order
from edgeprune.pruners.ops import cosine_matrix

# Six directions (degrees) with distinct magnitudes: d = 1 - cos depends on the angle only.
# Nearest-other angular gaps: 5, 5, 55, 50, 50, 70 -> token 5 (290 deg) is the most isolated.
# Greedy by hand (running min gap to the selected set, max wins):
#   after 5:  gaps to 0..4 = 70, 75, 130, 140, 90        -> 3
#   after 3:  0: 70, 1: 75, 2: min(130, 90) = 90, 4: 50  -> 2
#   after 2:  0: 60, 1: 55, 4: 50                        -> 0
#   after 0:  1: 5, 4: 50                                -> 4, then 1
ANGLES = [0, 5, 60, 150, 200, 290]
MAGNITUDES = [1.0, 2.0, 0.5, 3.0, 1.5, 4.0]
GREEDY_ORDER = [5, 3, 2, 0, 4, 1]


def polar(angles, magnitudes) -> torch.Tensor:
    rows = [[m * math.cos(math.radians(a)), m * math.sin(math.radians(a))] for a, m in zip(angles, magnitudes)]
    return torch.tensor([rows], dtype=torch.float32)                  # [1, N, 2]


def positions(keep: int, tokens: torch.Tensor) -> list[list[int]]:
    return build("divprune", keep=keep)(tokens=tokens).positions.tolist()


def test_first_pick_is_the_most_isolated_token():
    # Also fails if self is not excluded: every nearest distance would then be d(j, j) ~ 0.
    assert positions(1, polar(ANGLES, MAGNITUDES)) == [[5]]


def test_selected_tokens_are_masked_not_read_off_d_jj():
    # A zero token has d = 1 to everything, itself included (cosine 0 after the norm clamp). It is
    # the most isolated (nearest other at 1, the rest within 2 degrees of each other), so it is
    # picked first; were selected tokens left to d(j, j) = 0, its m would stay 1 and it would be
    # picked again. Greedy: 0, then 1 (tie at d = 1, lowest index), then 3 (2 deg from 1), then 2.
    tokens = polar([0, 0, 1, 2], [0.0, 1.0, 1.0, 1.0])
    assert positions(1, tokens) == [[0]]
    assert positions(2, tokens) == [[0, 1]]
    assert positions(3, tokens) == [[0, 1, 3]]


@pytest.mark.parametrize("keep", [2, 3, 4, 5])
def test_greedy_order_by_hand(keep):
    # The kept sets are nested: keep=k is the first k picks of the greedy order.
    assert positions(keep, polar(ANGLES, MAGNITUDES)) == [sorted(GREEDY_ORDER[:keep])]


def test_max_min_order_is_the_greedy_order_and_nested():
    # The order itself (scripts/train_mini_scorer.py distils AutoSelect from it), and on random tokens its
    # first K picks are the K-selection for every K.
    assert max_min_order(polar(ANGLES, MAGNITUDES), 6).tolist() == [GREEDY_ORDER]
    tokens = torch.randn(2, 40, 8, generator=torch.Generator().manual_seed(3))
    order = max_min_order(tokens, 40)
    assert sorted(order[0].tolist()) == list(range(40))
    for keep in (1, 7, 20):
        assert positions(keep, tokens) == order[:, :keep].sort(dim=-1).values.tolist()


def test_duplicated_tokens_are_not_both_kept():
    # Pentagon directions plus an exact copy of direction 1: with K = N - 1 one copy must go.
    tokens = polar([0, 72, 144, 216, 288, 72], [1.0, 2.0, 1.0, 1.0, 1.0, 2.0])
    kept = positions(5, tokens)[0]
    assert [0, 2, 3, 4] == [p for p in kept if p not in (1, 5)]
    assert (1 in kept) != (5 in kept)


def test_rows_are_independent():
    a = polar(ANGLES, MAGNITUDES)
    b = a.flip(1)  # index i -> 5 - i
    sel = build("divprune", keep=3)(tokens=torch.cat([a, b]))
    assert sel.positions.tolist() == [[2, 3, 5], [0, 2, 3]]
    torch.testing.assert_close(sel.tokens[0], a[0, [2, 3, 5]])


def naive_divprune(tokens: torch.Tensor, keep: int) -> list[int]:
    """The official O(K^2 * N) formulation for one row: recompute min over the selected set each step."""
    d = 1.0 - cosine_matrix(tokens.unsqueeze(0))[0]                   # [N, N]
    n = d.shape[0]
    nearest = [min(float(d[i, j]) for j in range(n) if j != i) for i in range(n)]
    selected = [max(range(n), key=lambda i: (nearest[i], -i))]        # ties to the lowest index
    while len(selected) < keep:
        rest = [j for j in range(n) if j not in selected]
        score = {j: float(d[selected, j].min()) for j in rest}
        selected.append(max(rest, key=lambda j: (score[j], -j)))
    return sorted(selected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_running_minimum_equals_naive_reference(seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(2, 40, 8, generator=g)
    got = positions(15, tokens)
    assert got == [naive_divprune(tokens[b], 15) for b in range(2)]
