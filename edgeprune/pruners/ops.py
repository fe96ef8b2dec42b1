"""Shared pruning math, written so the same code traces to a TensorRT-safe ONNX graph.

Rules kept here once (METHODS.md, DESIGN.md): ties go to the lowest index; TopK only with a
constant k; kept indices are sorted by a TopK over the K indices, never over N; masks come from
`arange` comparisons (no EyeLike, no NonZero, no ScatterND).
"""
from __future__ import annotations

import torch
from torch import Tensor

from edgeprune.errors import PrunerConfigError

__all__ = [
    "check_keep", "exporting", "topk_indices", "argmax", "gather_rows", "sort_by_position",
    "cosine_matrix", "one_hot", "NEG_INF", "unchosen_indices", "index_matrix", "apply_selection",
]

# A large finite negative: -inf would turn into NaN through 0 * -inf in masked arithmetic.
NEG_INF = -1e30


def check_keep(method: str, keep: int, n: int) -> None:
    if not (1 <= keep <= n):
        raise PrunerConfigError(f"{method}: keep={keep}, expected 1 <= keep <= N={n}")


def exporting() -> bool:
    """True while torch.onnx traces the module (graph construction, not eager execution)."""
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores per row, descending, ties to the lowest index. [..., k]

    ONNX TopK (sorted=1) already puts the lower index first on ties, so the graph gets a plain
    TopK with a constant k. torch.topk makes no such promise, so eager mode uses a stable sort,
    which has exactly the ONNX semantics.
    """
    if exporting():
        return torch.topk(scores, k, dim=-1, largest=True, sorted=True).indices
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def argmax(scores: Tensor) -> Tensor:
    """Index of the largest score per row, first occurrence (torch and ONNX ArgMax agree). [B]"""
    return torch.argmax(scores, dim=-1)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x [B, N, D], index [B, K] -> x[b, index[b, k]] as [B, K, D]."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def sort_by_position(positions: Tensor, *values: Tensor) -> tuple[Tensor, ...]:
    """Sort each row's positions ascending and reorder `values` [B, K, ...] alike.

    A TopK over the K kept indices (never over N, which may exceed TensorRT's 3840 limit).
    Positions are unique per row, so no tie rule is needed.
    """
    k = int(positions.shape[1])  # a Python constant in the graph: TopK needs a static k
    order = torch.topk(-positions, k, dim=1, largest=True, sorted=True).indices  # [B, K]
    sorted_positions = torch.gather(positions, 1, order)
    return (sorted_positions, *(gather_rows(v, order) for v in values))


def cosine_matrix(a: Tensor, b: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """Pairwise cosine similarity: a [B, N, D], b [B, M, D] (default a) -> [B, N, M]."""
    a_n = a / a.norm(dim=-1, keepdim=True).clamp_min(eps)
    b_n = a_n if b is None else b / b.norm(dim=-1, keepdim=True).clamp_min(eps)
    return a_n @ b_n.transpose(1, 2)


def one_hot(index: Tensor, n: int) -> Tensor:
    """index [B] or [B, K] -> bool mask [B, n] with True at the given indices (Equal, no scatter)."""
    ar = torch.arange(n, device=index.device)
    if index.dim() == 1:
        return ar.unsqueeze(0) == index.unsqueeze(1)
    return (ar.view(1, 1, n) == index.unsqueeze(-1)).any(dim=1)


def unchosen_indices(chosen: Tensor, ranks: Tensor) -> Tensor:
    """For each r in `ranks` [R], the index of the r-th token (0-based, in position order) NOT in
    `chosen` [B, J] (unique indices, any order) -> [B, R]. Each r must be < N - J.

    Sort-free over N (no NonZero, no TopK over N): with the chosen indices sorted, c_0 < ... < c_{J-1}
    (a TopK over J), c_j - j unchosen tokens precede c_j, so the r-th unchosen index is
    r + |{j : c_j - j <= r}|. Counts are summed in float32 (exact below 2^24; TensorRT reduces floats).
    """
    c = sort_by_position(chosen)[0]                                        # [B, J] ascending
    before = c - torch.arange(c.shape[1], device=c.device).unsqueeze(0)    # [B, J] unchosen tokens before c_j
    count = (before.unsqueeze(1) <= ranks.view(1, -1, 1)).to(torch.float32).sum(dim=-1)  # [B, R]
    return ranks.unsqueeze(0) + count.to(torch.long)


def index_matrix(index: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """index [B, K] -> [B, K, n] with row k one-hot at index[b, k] (a gather as a merge-weight matrix)."""
    return (index.unsqueeze(-1) == torch.arange(n, device=index.device)).to(dtype)


def apply_selection(selection, x: Tensor) -> Tensor:
    """The gather or merge a pruner applied to its `space` signal, applied to other per-token features
    x [B, N, ...] -> [B, K, ...] (Selection.weights; a plain gather at the positions when it is None)."""
    b, n = x.shape[:2]
    flat = x.reshape(b, n, -1)
    if selection.weights is None:
        out = gather_rows(flat, selection.positions)
    else:
        out = selection.weights.to(flat.dtype) @ flat
    return out.reshape(b, out.shape[1], *x.shape[2:])
