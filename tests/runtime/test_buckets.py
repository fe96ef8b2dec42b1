"""The resolution-bucket rule (runtime/buckets.py) on hand-made sizes, one test per step."""
from __future__ import annotations

import pytest

from edgeprune.errors import EdgepruneError
from edgeprune.runtime.buckets import pick_bucket

SIZES = [(448, 448), (336, 448), (448, 336), (896, 896)]


def test_step1_closest_aspect():
    assert pick_bucket((300, 400), SIZES) == 1       # 0.75 exactly
    assert pick_bucket((400, 300), SIZES) == 2
    assert pick_bucket((500, 620), SIZES) == 1       # 0.81: closer to 0.75 than to 1 (in log ratio)


def test_step2_smallest_that_holds_the_image_else_largest():
    assert pick_bucket((400, 400), SIZES) == 0       # 448^2 holds 400^2
    assert pick_bucket((600, 600), SIZES) == 3       # only 896^2 holds it
    assert pick_bucket((2000, 2000), SIZES) == 3     # none holds it: the largest


def test_step3_first_listed_on_ties():
    assert pick_bucket((100, 100), [(224, 224), (224, 224)]) == 0
    assert pick_bucket((900, 900), [(224, 224), (224, 224)]) == 0


def test_errors():
    with pytest.raises(EdgepruneError, match="positive"):
        pick_bucket((0, 10), SIZES)
    with pytest.raises(EdgepruneError, match="no resolution buckets"):
        pick_bucket((10, 10), [])
