"""Position ids of the LLM input [prefix text, K image tokens, suffix text] (DESIGN.md, Position ids).

- original: image token k sits at prefix_len + positions[k] (gaps allowed); the suffix continues from
  prefix_len + N, as if the image had not been pruned (AutoSelect, DART, TensorRT Edge-LLM).
- compact:  image tokens at prefix_len + 0..K-1; the suffix continues from prefix_len + K.
"""
from __future__ import annotations

import numpy as np

from edgeprune.errors import EdgepruneError

__all__ = ["POSITION_MODES", "sequence_positions"]

POSITION_MODES = ("original", "compact")


def sequence_positions(prefix_len: int, image_positions: np.ndarray, num_image_tokens: int,
                       suffix_len: int, mode: str) -> np.ndarray:
    """image_positions [B, K] (ascending, in 0..N-1) -> int64 position ids [B, prefix + K + suffix]."""
    if mode not in POSITION_MODES:
        raise EdgepruneError(f"position mode {mode!r}; expected one of {', '.join(POSITION_MODES)}")
    image_positions = np.asarray(image_positions, dtype=np.int64)
    b, k = image_positions.shape
    prefix = np.broadcast_to(np.arange(prefix_len, dtype=np.int64), (b, prefix_len))
    if mode == "original":
        image, after = prefix_len + image_positions, prefix_len + num_image_tokens
    else:
        image, after = np.broadcast_to(prefix_len + np.arange(k, dtype=np.int64), (b, k)), prefix_len + k
    suffix = np.broadcast_to(after + np.arange(suffix_len, dtype=np.int64), (b, suffix_len))
    return np.concatenate([prefix, image, suffix], axis=1)
