"""D2Pruner-style (METHODS.md, D2Pruner-style): one test per spec step, exact indices on hand-made
grids. alpha = 0 makes the graph pure grid adjacency, so the expected picks follow from the grid."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edgeprune.errors import PrunerConfigError
from edgeprune.pruners import build
from edgeprune.pruners.d2pruner import prior_on_grid


def ranked_attn(n: int, order: list[int]) -> torch.Tensor:
    """attn [1, n]: the cells in `order` get descending values above every other cell."""
    attn = torch.linspace(0.01, 0.02, n)                              # the rest: low, rising with index
    for rank, cell in enumerate(order):
        attn[cell] = 1.0 - 0.1 * rank
    return attn.unsqueeze(0)


def run(keep: int, attn: torch.Tensor, grid, tokens=None, **cfg) -> list[list[int]]:
    n = grid[0] * grid[1]
    if tokens is None:
        tokens = torch.randn(attn.shape[0], n, 4, generator=torch.Generator().manual_seed(0))
    return build("d2pruner", keep=keep, **cfg)(tokens=tokens, attn=attn, grid=grid).positions.tolist()


def test_pivot_count_is_floor_of_ratio_times_keep():
    assert build("d2pruner", keep=64).num_pivots == 44
    assert build("d2pruner", keep=90).num_pivots == 63      # float 0.7 * 90 = 62.99...
    assert build("d2pruner", keep=1).num_pivots == 0
    assert build("d2pruner", keep=10, pivot_ratio=1.0).num_pivots == 10


def test_without_edges_the_most_important_tokens_are_kept():
    attn = ranked_attn(16, [6, 1, 12, 7, 3])                # neighbours of each other, on purpose
    assert run(5, attn, (4, 4), theta=1.0) == [[1, 3, 6, 7, 12]]   # S <= 1: no S > theta


def test_neighbours_of_pivots_are_skipped():
    # K = 3: pivots 0 and 3 (P = 2), then one greedy pick. Cells 1 and 5 rank higher than 10 but
    # touch pivot 0, cell 6 touches pivot 3: the pick is 10.
    attn = ranked_attn(16, [0, 3, 1, 5, 6, 10, 11, 12])
    assert run(3, attn, (4, 4), alpha=0.0, theta=0.5) == [[0, 3, 10]]


def test_neighbours_of_greedy_picks_are_skipped():
    # K = 4: pivots 0, 3; greedy picks 10, then 12, since 11 (ranked above 12) touches 10.
    attn = ranked_attn(16, [0, 3, 1, 5, 6, 10, 11, 12])
    assert run(4, attn, (4, 4), alpha=0.0, theta=0.5) == [[0, 3, 10, 12]]


def test_adjacency_follows_the_grid_not_the_raster_order():
    # Grid 2 x 5: cell 3 touches pivot 4 (same row); cell 5 follows 4 in raster order but sits at
    # the other end of the next row.
    attn = ranked_attn(10, [4, 3, 5])
    assert run(2, attn, (2, 5), alpha=0.0, theta=0.5) == [[4, 5]]


def polar(angles) -> torch.Tensor:
    return torch.tensor([[[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles]])


# 3 x 3 grid, tokens as directions. Pivot 0 (0 deg, most important); cell 8 (10 deg, far corner)
# is nearly a copy of it (cos 0.985); cell 1 (70 deg) is its grid neighbour with cos 0.34; cell 4
# (180 deg) makes min(cos) = -1, so minmax(cos) = (cos + 1) / 2: 0.99 for 8, 0.67 for 1.
# K = 2: the pivot, then one greedy pick between 8 and 1.
ANGLES = [0, 70, 120, 200, 180, 250, 300, 330, 10]


@pytest.mark.parametrize("order,alpha,theta,expected", [
    ([0, 8, 1], 1.0, 0.8, [0, 1]),    # similarity only: 8 (0.99) is an edge of the pivot, 1 (0.67) is not
    ([0, 8, 1], 1.0, 0.999, [0, 8]),  # a higher theta: no edge, so 8 is kept
    ([0, 8, 1], 0.5, 0.8, [0, 8]),    # half adjacency: 8 is no grid neighbour, S = 0.5 * 0.99 < 0.8
    ([0, 1, 8], 0.5, 0.8, [0, 8]),    # ... while neighbour 1 has S = 0.5 * 0.67 + 0.5 = 0.84 > 0.8
    ([0, 1, 8], 0.5, 0.9, [0, 1]),    # ... which is below theta = 0.9
    ([0, 1, 8], 1.0, 0.8, [0, 1]),    # similarity only: 1 is no edge
])
def test_theta_and_alpha_shape_the_graph(order, alpha, theta, expected):
    attn = ranked_attn(9, order)
    assert run(2, attn, (3, 3), tokens=polar(ANGLES), alpha=alpha, theta=theta) == [expected]


def test_fallback_takes_the_most_important_unselected_when_nothing_is_available():
    # 3 x 3 grid: the centre touches every cell, so after the pivots (4, 0) nothing is available;
    # the greedy step falls back to the most important unselected cell, 8.
    attn = ranked_attn(9, [4, 0, 8, 2])
    assert run(3, attn, (3, 3), alpha=0.0, theta=0.5) == [[0, 4, 8]]


def test_fallback_is_decided_per_row():
    # Row 0 runs out of available cells (as above); row 1's pivots leave 2..8 minus neighbours.
    attn = torch.cat([ranked_attn(9, [4, 0, 8, 2]), ranked_attn(9, [0, 1, 8, 7])])
    assert run(3, attn, (3, 3), alpha=0.0, theta=0.5) == [[0, 4, 8], [0, 1, 8]]


@pytest.mark.parametrize("kind", [list, np.asarray, torch.tensor])
def test_bias_debiasing_flips_the_choice(kind):
    # attn favours cell 0, but cell 0 gets that attention everywhere (prior 0.8): I = [0.5, 1.5, 0.8, 0.4].
    attn = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    assert run(1, attn, (2, 2), theta=1.0) == [[0]]
    assert run(1, attn, (2, 2), theta=1.0, bias=kind([0.8, 0.2, 0.25, 0.25])) == [[1]]


def test_bias_of_another_grid_is_resized_bilinearly():
    # 2 x 2 -> 4 x 4, align_corners=False: each axis maps [v0, v1] to [v0, .75v0+.25v1, .25v0+.75v1, v1].
    pruner = build("d2pruner", keep=1, bias=[1.0, 2.0, 3.0, 4.0])
    expected = torch.tensor([[1.0, 1.25, 1.75, 2.0], [1.5, 1.75, 2.25, 2.5],
                             [2.5, 2.75, 3.25, 3.5], [3.0, 3.25, 3.75, 4.0]]).reshape(-1)
    torch.testing.assert_close(prior_on_grid(pruner.bias, (4, 4)), expected + 1e-7)
    # Equal attention everywhere: no prior keeps cell 0 (tie to the lowest index); a prior that is
    # lowest at the bottom right (resized: 1 at cell 15) makes cell 15 the most important.
    attn = torch.full((1, 16), 1 / 16)
    assert run(1, attn, (4, 4), theta=1.0) == [[0]]
    assert run(1, attn, (4, 4), theta=1.0, bias=[4.0, 3.0, 2.0, 1.0]) == [[15]]


@pytest.mark.parametrize("bias,match", [
    ([[1.0, 2.0], [3.0, 4.0]], r"bias has shape \(2, 2\), expected a non-empty 1-D prior"),
    ([1.0, -2.0, 3.0, 4.0], r"bias has negative or non-finite values"),
    ("calibration.json", r"bias is a str, expected a 1-D tensor, array, list or a .npy file"),
    ("missing.npy", r"bias file 'missing.npy' cannot be read"),
    (["a", "b"], r"bias cannot be read as numbers"),
])
def test_bad_bias_is_clear_error(bias, match):
    with pytest.raises(PrunerConfigError, match=rf"d2pruner: {match}"):
        build("d2pruner", keep=1, bias=bias)


def test_bias_that_cannot_be_resized_is_clear_error():
    with pytest.raises(PrunerConfigError, match=r"d2pruner: bias has N'=6 values, expected N=16 or a square"):
        run(1, torch.full((1, 16), 1 / 16), (4, 4), bias=[1.0] * 6)


@pytest.mark.parametrize("option,value", [("alpha", 1.5), ("alpha", -0.1), ("pivot_ratio", 2.0), ("pivot_ratio", 0.0),
                                          ("theta", 5.0), ("theta", -0.5)])
def test_bad_ratio_is_clear_error(option, value):
    with pytest.raises(PrunerConfigError, match=rf"d2pruner: {option}={value}, expected 0 <=? {option} <= 1"):
        build("d2pruner", keep=4, **{option: value})


@pytest.mark.parametrize("option,value", [("theta", "high"), ("alpha", float("nan")), ("pivot_ratio", None)])
def test_non_numeric_option_is_clear_error(option, value):
    with pytest.raises(PrunerConfigError, match=rf"d2pruner: {option}=.*, expected a finite number"):
        build("d2pruner", keep=4, **{option: value})


def test_bias_from_a_calibration_file(tmp_path):
    np.save(tmp_path / "bias.npy", np.array([4.0, 3.0, 2.0, 1.0], dtype=np.float32))
    attn = torch.full((1, 16), 1 / 16)
    assert run(1, attn, (4, 4), theta=1.0, bias=str(tmp_path / "bias.npy")) == [[15]]
