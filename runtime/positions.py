"""Position ids of the LLM input [prefix text, K image tokens, suffix text] (DESIGN.md, Position ids).

1-D RoPE (`rope = "1d"`, LLaMA-style), ids [B, L]:
- original: image token k sits at prefix_len + positions[k] (gaps allowed); the suffix continues from
  prefix_len + N, as if the image had not been pruned (AutoSelect, DART, TensorRT Edge-LLM).
- compact:  image tokens at prefix_len + 0..K-1; the suffix continues from prefix_len + K.

M-RoPE (`rope = "mrope"`, Qwen2-VL / Qwen2.5-VL), ids [3, B, L] (temporal, height, width):
- text token at sequence offset p: (p, p, p);
- kept image token at merged-grid index i = r * W + c (grid H x W): (s, s + r, s + c) with s = prefix_len,
  its id in the FULL grid whatever was pruned (Qwen2VLModel.get_rope_index, t = 0 for an image);
- the suffix continues from s + max(H, W), the model's own rule (get_rope_index advances by
  max(grid_h, grid_w) // merge after an image, which is the full grid's max id + 1), so text ids do not
  depend on K. Only mode "original" exists for M-RoPE: renumbering kept tokens would break the 2-D
  geometry the ids encode.

The torch reference (edgeprune/reference.py) and the runtime (runtime/pipeline.py) both call
`build_positions`, so they cannot disagree.
"""
from __future__ import annotations

import numpy as np

from edgeprune.errors import EdgepruneError

__all__ = ["POSITION_MODES", "ROPE_KINDS", "sequence_positions", "mrope_positions", "build_positions",
           "build_positions_rows", "check_rope_mode", "next_positions", "largest_position"]

POSITION_MODES = ("original", "compact")
ROPE_KINDS = ("1d", "mrope")


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


def mrope_positions(prefix_len: int, image_positions: np.ndarray, grid: tuple[int, int] | None,
                    suffix_len: int) -> np.ndarray:
    """M-RoPE ids [3, B, prefix + K + suffix] (module docstring); `grid` (H, W) is the merged grid the
    positions index (None with K = 0: a text-only prompt, ids 0..L-1 on all three axes)."""
    image_positions = np.asarray(image_positions, dtype=np.int64)
    b, k = image_positions.shape
    s = prefix_len
    prefix = np.broadcast_to(np.arange(prefix_len, dtype=np.int64), (3, b, prefix_len))
    if grid is None or k == 0:
        after, image = prefix_len, np.zeros((3, b, 0), dtype=np.int64)
    else:
        h, w = int(grid[0]), int(grid[1])
        if image_positions.size and (image_positions.min() < 0 or image_positions.max() >= h * w):
            raise EdgepruneError(f"image positions outside the {h}x{w} grid: min {image_positions.min()}, "
                                 f"max {image_positions.max()}")
        rows, cols = image_positions // w, image_positions % w                    # [B, K]
        image = np.stack([np.full_like(rows, s), s + rows, s + cols])           # [3, B, K]
        after = s + max(h, w)
    suffix = np.broadcast_to(after + np.arange(suffix_len, dtype=np.int64), (3, b, suffix_len))
    return np.ascontiguousarray(np.concatenate([prefix, image, suffix], axis=2))


def check_rope_mode(rope: str, mode: str) -> None:
    """Raise EdgepruneError unless (rope, mode) is a combination build_positions implements."""
    if rope not in ROPE_KINDS:
        raise EdgepruneError(f"rope {rope!r}; expected one of {', '.join(ROPE_KINDS)}")
    if mode not in POSITION_MODES:
        raise EdgepruneError(f"position mode {mode!r}; expected one of {', '.join(POSITION_MODES)}")
    if rope == "mrope" and mode != "original":
        raise EdgepruneError(f"position mode {mode!r} with M-RoPE: expected 'original' (kept tokens keep their "
                             f"(t, h, w) grid ids; see runtime/positions.py)")


def build_positions(rope: str, prefix_len: int, image_positions: np.ndarray, num_image_tokens: int,
                    grid: tuple[int, int] | None, suffix_len: int, mode: str) -> np.ndarray:
    """The position ids the LLM gets: [B, L] for rope "1d", [3, B, L] for "mrope"."""
    check_rope_mode(rope, mode)
    if rope == "1d":
        return sequence_positions(prefix_len, image_positions, num_image_tokens, suffix_len, mode)
    return mrope_positions(prefix_len, image_positions, grid, suffix_len)


def build_positions_rows(rope: str, prefix_len: int, image_positions: np.ndarray, nums: list[int],
                         grids: list[tuple[int, int]], suffix_len: int | list[int], mode: str) -> np.ndarray:
    """build_positions with a grid, N and suffix length per row (resolution buckets: rows of one batch may
    come from graphs of different sizes; per-row prompts: suffixes of different lengths; K is the same).
    Shorter rows are right-padded with their own last ids repeated, so a row's largest (and, for 1-D, last)
    id is still that of its last real token: next_positions needs no mask. Same layout: [B, L] or [3, B, L]."""
    image_positions = np.asarray(image_positions, dtype=np.int64)
    b = image_positions.shape[0]
    lens = [int(suffix_len)] * b if np.isscalar(suffix_len) else [int(v) for v in suffix_len]
    rows = [build_positions(rope, prefix_len, image_positions[i:i + 1], int(nums[i]),
                            None if grids[i] is None else tuple(grids[i]), lens[i], mode) for i in range(b)]
    width = max(r.shape[-1] for r in rows)
    rows = [np.concatenate([r, np.repeat(r[..., -1:], width - r.shape[-1], axis=-1)], axis=-1) for r in rows]
    return np.concatenate(rows, axis=-2)


def largest_position(rope: str, prefix_len: int, keep: int, num_image_tokens: int, grid: tuple[int, int] | None,
                     suffix_len: int, mode: str) -> int:
    """A prompt's largest position id whichever K of the N image tokens are kept (the last K give the largest
    ids), so the context-length rule (runtime/checks.py) holds before the vision graph runs."""
    worst = np.arange(max(num_image_tokens - keep, 0), num_image_tokens, dtype=np.int64)[None]     # [1, K]
    ids = build_positions(rope, prefix_len, worst, num_image_tokens, grid, suffix_len, mode)
    return int(ids.max()) if ids.size else -1


def next_positions(position_ids: np.ndarray, step: int) -> np.ndarray:
    """Ids of decode step `step` (0-based). 1-D: last prefill id + 1 + step per row, [B, L] -> [B, 1].
    M-RoPE: the row's largest prefill id + 1 + step on all three axes (Qwen2-VL's rope_deltas rule),
    [3, B, L] -> [3, B, 1]."""
    position_ids = np.asarray(position_ids, dtype=np.int64)
    if position_ids.ndim == 3:
        top = position_ids.max(axis=(0, 2))                                     # [B]
        return np.broadcast_to(top[None, :, None] + 1 + step, (3, position_ids.shape[1], 1)).copy()
    return position_ids[..., -1:] + 1 + step
