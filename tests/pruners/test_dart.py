"""DART (METHODS.md, DART): one test per spec step, exact indices on hand-made 2-D tokens."""
from __future__ import annotations

import math

import pytest
import torch

from edgeprune.errors import PrunerConfigError
from edgeprune.pruners import build
from edgeprune.pruners.dart import pivot_quotas


def polar(*points: tuple[float, float]) -> torch.Tensor:
    """(angle in degrees, magnitude) pairs -> tokens [1, N, 2]; cosine depends on the angles only."""
    rows = [[m * math.cos(math.radians(a)), m * math.sin(math.radians(a))] for a, m in points]
    return torch.tensor([rows], dtype=torch.float32)


def positions(keep: int, tokens: torch.Tensor, **cfg) -> list[int]:
    return build("dart", keep=keep, **cfg)(tokens=tokens).positions[0].tolist()


def test_pivots_are_the_largest_l1_norms():
    # Token 1 has the largest L1 norm (14) but not the largest L2 norm (9.9 < 10 of token 0).
    tokens = torch.tensor([[[10.0, 0.0], [7.0, 7.0], [1.0, 0.0], [0.0, -2.0]]])
    assert positions(1, tokens, pivots=1) == [1]
    assert positions(2, tokens, pivots=2) == [0, 1]


def test_fewer_tokens_than_pivots_keeps_the_top_norms():
    # K = 3 < P = 8: P becomes K, so the output is the three largest L1 norms.
    norms = [3.0, 9.0, 1.0, 7.0, 2.0, 8.0, 4.0, 5.0, 6.0, 0.5]
    tokens = polar(*[(0.0, m) for m in norms])
    assert positions(3, tokens) == [1, 3, 5]


def test_quota_split_gives_the_remainder_to_the_first_pivots():
    assert pivot_quotas(keep=10, pivots=3) == [3, 2, 2]   # K - P = 7 = 2 * 3 + 1
    assert pivot_quotas(keep=64, pivots=8) == [7] * 8
    assert pivot_quotas(keep=14, pivots=4) == [3, 3, 2, 2]   # K - P = 10 = 2 * 4 + 2
    assert pivot_quotas(keep=4, pivots=4) == [0, 0, 0, 0]


def test_pivots_take_their_quota_in_descending_norm_order():
    # Pivot A (index 5, 0 deg, norm 10) comes first with quota 2, pivot B (index 2, 90 deg, norm 8)
    # second with quota 1 (K - P = 3 over P = 2).
    tokens = polar((180, 1), (270, 1), (90, 8), (150, 1), (240, 1), (0, 10), (45, 1), (315, 1))
    # A takes the two least similar to it: 0 (cos -1), 3 (cos -0.87); B then takes 1 (cos -1).
    # Reversed order would give {1, 4} to B and {0} to A; quotas [1, 2] would give {0} and {1, 4}.
    assert positions(5, tokens, pivots=2) == [0, 1, 2, 3, 5]


def test_a_token_kept_by_one_pivot_is_not_taken_again():
    # Both pivots (A = 0: 0 deg, B = 1: 30 deg) find token 2 (200 deg) least similar. A takes it;
    # B must take its next least similar, token 4 (250 deg, cos -0.77), not token 2 a second time.
    tokens = polar((0, 10), (30, 5), (200, 1), (150, 1), (250, 1))
    assert positions(4, tokens, pivots=2) == [0, 1, 2, 4]


def test_duplicates_of_a_pivot_are_not_kept():
    # Token 3 repeats the pivot's direction (cos 1): every other token is taken before it.
    tokens = polar((0, 10), (120, 1), (240, 1), (0, 1), (60, 1))
    assert positions(4, tokens, pivots=1) == [0, 1, 2, 4]
    assert 3 not in positions(4, tokens, pivots=1)


def test_rows_are_independent():
    a = polar((180, 1), (270, 1), (90, 8), (150, 1), (240, 1), (0, 10), (45, 1), (315, 1))
    b = a.flip(1)  # the same points in reverse order: indices i -> 7 - i
    sel = build("dart", keep=5, pivots=2)(tokens=torch.cat([a, b]))
    assert sel.positions.tolist() == [[0, 1, 2, 3, 5], [2, 4, 5, 6, 7]]
    torch.testing.assert_close(sel.tokens[1], b[0, [2, 4, 5, 6, 7]])


@pytest.mark.parametrize("pivots", [0, -3, 2.5, True])
def test_bad_pivots_is_clear_error(pivots):
    with pytest.raises(PrunerConfigError, match=r"dart: pivots=.*expected an integer >= 1"):
        build("dart", keep=8, pivots=pivots)
