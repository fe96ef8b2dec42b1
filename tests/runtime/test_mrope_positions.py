"""M-RoPE position ids (runtime/positions.py) on a hand-made small grid, the decode rule, the
1-D/M-RoPE dispatch, and the manifest default for bundles without positions.rope."""
from __future__ import annotations

import numpy as np
import pytest

from edgeprune.errors import EdgepruneError
from edgeprune.runtime.positions import build_positions, mrope_positions, next_positions, sequence_positions


def test_pruned_sequence_by_hand():
    # grid 2 x 3 (N = 6), prefix of 2 text tokens, kept merged tokens 0, 4, 5 -> (r, c) = (0,0), (1,1), (1,2)
    pos = mrope_positions(2, np.array([[0, 4, 5]]), (2, 3), 2)
    expected = np.array([
        [0, 1, 2, 2, 2, 5, 6],   # t: text 0 1, image all at s = 2, text from s + max(H, W) = 5
        [0, 1, 2, 3, 3, 5, 6],   # h: s + r
        [0, 1, 2, 3, 4, 5, 6],   # w: s + c
    ])[:, None]
    np.testing.assert_array_equal(pos, expected)
    assert pos.dtype == np.int64 and pos.shape == (3, 1, 7)


def test_rows_differ_in_batch():
    pos = mrope_positions(1, np.array([[1, 3], [0, 2]]), (2, 2), 1)
    np.testing.assert_array_equal(pos[:, 0], [[0, 1, 1, 3], [0, 1, 2, 3], [0, 2, 2, 3]])
    np.testing.assert_array_equal(pos[:, 1], [[0, 1, 1, 3], [0, 1, 2, 3], [0, 1, 1, 3]])


def test_suffix_does_not_depend_on_k():
    a = mrope_positions(3, np.array([[0]]), (4, 5), 2)
    b = mrope_positions(3, np.arange(20)[None], (4, 5), 2)
    np.testing.assert_array_equal(a[:, :, -2:], b[:, :, -2:])
    np.testing.assert_array_equal(a[:, 0, -2:], [[8, 9]] * 3)


def test_decode_positions():
    pos = mrope_positions(2, np.array([[0, 4, 5]]), (2, 3), 0)             # ends on an image token
    np.testing.assert_array_equal(next_positions(pos, 0), [[[5]], [[5]], [[5]]])   # max id 4 + 1, every axis
    np.testing.assert_array_equal(next_positions(pos, 2), [[[7]]] * 3)
    np.testing.assert_array_equal(next_positions(np.array([[0, 1, 9]]), 1), [[11]])  # 1-D: last + 1 + step


def test_text_only_and_dispatch():
    np.testing.assert_array_equal(mrope_positions(2, np.zeros((1, 0), np.int64), None, 2), np.tile(np.arange(4), (3, 1, 1)))
    kept = np.array([[0, 2]])
    np.testing.assert_array_equal(build_positions("1d", 1, kept, 4, (2, 2), 1, "original"),
                                  sequence_positions(1, kept, 4, 1, "original"))
    assert build_positions("mrope", 1, kept, 4, (2, 2), 1, "original").shape == (3, 1, 4)
    with pytest.raises(EdgepruneError, match="M-RoPE"):
        build_positions("mrope", 1, kept, 4, (2, 2), 1, "compact")
    with pytest.raises(EdgepruneError, match="rope"):
        build_positions("3d", 1, kept, 4, (2, 2), 1, "original")
    with pytest.raises(EdgepruneError, match="outside"):
        mrope_positions(0, np.array([[4]]), (2, 2), 0)
