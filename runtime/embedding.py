"""Token embeddings looked up with numpy from the table the bundle stores once. numpy only.

The table is not a graph (no ONNX Runtime call per token): `llm.spec["embed_table"]` (export/llm.py) says which
file holds it, at which byte offset, with which shape and dtype. A model whose LM head is tied to its embeddings
stores the table once, as the LM head's weight inside decoder.onnx.data, so the rows are read from those bytes:

- float tables: "tensors": {"weight": [V, D]} in the LLM's dtype;
- block-quantized tables (the LM head quantized to MatMulNBits, --llm-precision int4/int8): "tensors":
  {"data": uint8 [V, k_blocks, block_size * bits / 8], "scales": [V * k_blocks], "zero_points" (optional): uint8
  packed like data}, with "bits" and "block_size". A row is dequantized as MatMulNBits does:
  (q - zero_point) * scale per block, zero point 2^(bits - 1) when absent, low bits first in each byte.

The file is memory-mapped: only the pages of the rows asked for are read.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeprune.errors import BundleError, EdgepruneError
from edgeprune.runtime.format import EmbedTable

__all__ = ["EmbeddingTable", "dequantize_rows"]


class EmbeddingTable:
    """`table(ids [B, L] int)` -> [B, L, D] in the table's output dtype."""

    def __init__(self, bundle_dir: str | Path, entry: dict):
        path = Path(bundle_dir) / entry[EmbedTable.FILE]
        if not path.is_file():
            raise BundleError(f"{path}: embedding table file not found")
        self.vocab, self.dim = (int(v) for v in entry[EmbedTable.SHAPE])
        self.dtype = np.dtype(entry[EmbedTable.DTYPE])
        self.bits = entry.get(EmbedTable.BITS)
        self.block_size = entry.get(EmbedTable.BLOCK_SIZE)
        size = path.stat().st_size
        self.tensors = {}
        for name, t in entry[EmbedTable.TENSORS].items():
            dtype, shape, offset = np.dtype(t[EmbedTable.DTYPE]), tuple(t[EmbedTable.SHAPE]), int(t[EmbedTable.OFFSET])
            end = offset + dtype.itemsize * int(np.prod(shape))
            if offset < 0 or end > size:
                raise BundleError(f"{path}: embedding tensor {name!r} at bytes {offset}..{end} lies outside the "
                                  f"file ({size} bytes); re-export the bundle")
            self.tensors[name] = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
        expected = {EmbedTable.WEIGHT} if self.bits is None else {EmbedTable.DATA, EmbedTable.SCALES}
        if not expected <= set(self.tensors):
            raise BundleError(f"{path}: embedding table lists tensors {sorted(self.tensors)}, expected "
                              f"{sorted(expected)}")

    def __call__(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
            bad = int(ids.max() if ids.max() >= self.vocab else ids.min())
            raise EdgepruneError(f"token id {bad} is outside the vocabulary 0..{self.vocab - 1}")
        flat = ids.reshape(-1).astype(np.int64)
        if self.bits is None:
            rows = np.asarray(self.tensors[EmbedTable.WEIGHT][flat], dtype=self.dtype)
        else:
            zp = self.tensors.get(EmbedTable.ZERO_POINTS)
            rows = dequantize_rows(self.tensors[EmbedTable.DATA][flat], self.tensors[EmbedTable.SCALES], flat,
                                   None if zp is None else zp, self.bits, self.block_size, self.dim).astype(self.dtype)
        return rows.reshape(*ids.shape, self.dim)


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [..., n] holding 8 // bits values each, low bits first -> uint8 [..., n * 8 // bits]."""
    if bits == 8:
        return packed
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits)
    values = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


def dequantize_rows(data: np.ndarray, scales: np.ndarray, rows: np.ndarray, zero_points, bits: int, block_size: int,
                    dim: int) -> np.ndarray:
    """MatMulNBits weight rows -> float32 [R, dim]. data: uint8 [R, k_blocks, blob] (already the selected rows),
    scales: [V * k_blocks] or [V, k_blocks] (all rows), zero_points: packed uint8 or float [V, k_blocks] (all rows), or None."""
    r, k_blocks, _ = data.shape
    q = _unpack(np.asarray(data), bits).astype(np.float32)                  # [R, k_blocks, block_size]
    scale = np.asarray(scales).reshape(-1, k_blocks)[rows].astype(np.float32)  # [R, k_blocks]
    if zero_points is None:
        zero = np.float32(1 << (bits - 1))
    elif np.asarray(zero_points).dtype.kind == "f":                         # unpacked float zero points (HQQ)
        zero = np.asarray(zero_points).reshape(-1, k_blocks)[rows].astype(np.float32)[..., None]
    else:
        packed = np.asarray(zero_points).reshape(-1, -(-k_blocks * bits // 8))[rows]   # [R, ceil(kb*bits/8)]
        zero = _unpack(packed, bits)[:, :k_blocks].astype(np.float32)[..., None]      # [R, k_blocks, 1]
    values = (q - zero) * scale[..., None]                                  # [R, k_blocks, block_size]
    return values.reshape(r, k_blocks * block_size)[:, :dim]
