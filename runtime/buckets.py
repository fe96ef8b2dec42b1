"""Resolution buckets: which of a bundle's vision graphs (each a fixed input size, its own static N,
the same K) an image goes through. numpy-free, torch-free; the torch reference uses the same rule.

Rule (`pick_bucket`), for an image of h x w pixels and bucket sizes (h_b, w_b):
1. keep the buckets whose aspect ratio is closest to the image's: minimal |log(h/w) - log(h_b/w_b)|
   (so resizing distorts the image least);
2. among them, the smallest bucket whose area h_b * w_b is at least the image's (the least upscaling
   that loses no pixels); if none is that large, the largest;
3. remaining ties go to the bucket listed first.
"""
from __future__ import annotations

import math

from edgeprune.errors import EdgepruneError

__all__ = ["pick_bucket"]


def pick_bucket(image_hw: tuple[int, int], sizes: list[tuple[int, int]]) -> int:
    """Index into `sizes` of the bucket for an image of (height, width) pixels (module docstring)."""
    h, w = int(image_hw[0]), int(image_hw[1])
    if h < 1 or w < 1:
        raise EdgepruneError(f"image of {h}x{w} pixels; expected a positive height and width")
    if not sizes:
        raise EdgepruneError("no resolution buckets to choose from")
    aspect = math.log(h / w)
    # 1. closest aspect ratio (rounded so that equal ratios written differently compare equal)
    dist = [round(abs(aspect - math.log(bh / bw)), 9) for bh, bw in sizes]
    best = [i for i, d in enumerate(dist) if d == min(dist)]
    # 2. smallest that holds the image's area, else the largest; 3. first listed on ties (min/max keep order)
    area = h * w
    holding = [i for i in best if sizes[i][0] * sizes[i][1] >= area]
    if holding:
        return min(holding, key=lambda i: sizes[i][0] * sizes[i][1])
    return max(best, key=lambda i: (sizes[i][0] * sizes[i][1], -i))
