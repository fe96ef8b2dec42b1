"""Frozen DINOv2 signals of Fashion-MNIST images, computed once and cached on disk.

Alignment and evaluation both need the encoder outputs of the same images many times (every epoch,
every method, every K); the encoder is frozen, so they are computed once per image and stored under
the edgeprune cache dir (models/_cache.py): one safetensors file per image, written atomically.
Encoding is float32 (bf16 autocast measured slower here for this encoder).

Per image: `feats` [N, C] (the adapter's `feats`: layer -2 patch tokens, pre-projector), `cls` [C]
(the final [CLS] after the last layer norm, for the linear probe), and for kind "eval" also `keys`
[N, hd] and `attn` [N] exactly as `adapter.encode` computes them. Kind "train" stores `feats` as
float16 (half the disk and memory; training input only, never an eval input).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from edgeprune.errors import EdgepruneError
from edgeprune.eval.data import load_split
from edgeprune.fileio import atomic_write
from edgeprune.models._cache import cache_dir, file_sha256

__all__ = ["encode_full", "cached_signals", "signals_dir", "KINDS"]

log = logging.getLogger(__name__)

KINDS = {"train": ("feats", "cls"), "eval": ("feats", "keys", "attn", "cls")}


@torch.no_grad()
def encode_full(adapter, pixels: Tensor, need: tuple[str, ...] = ("feats", "keys", "attn", "cls")) -> dict[str, Tensor]:
    """One pass of a ClsViTAdapter's encoder: the signals `adapter.encode` returns (same code path:
    `_embed`, the layers, `_keys_attn`) plus the final [CLS] after the encoder's last layer norm."""
    adapter.check_pixels(pixels)
    layers = adapter._layers()
    fl = adapter.feature_layer
    hidden = adapter._embed(pixels)                                  # [B, 1+N, C]
    for layer in layers[:fl]:
        hidden = layer(hidden, None)
    out: dict[str, Tensor] = {}
    if "keys" in need or "attn" in need:
        keys, attn = adapter._keys_attn(layers[fl], hidden, ("keys", "attn"))
        out.update(keys=keys, attn=attn)                             # [B, N, hd], [B, N]
    hidden = layers[fl](hidden, None)
    out["feats"] = hidden[:, 1:]                                     # [B, N, C]
    if "cls" in need:
        for layer in layers[fl + 1:]:
            hidden = layer(hidden, None)
        out["cls"] = adapter.vision.layernorm(hidden[:, 0])          # [B, C]
    return {k: v for k, v in out.items() if k in need}


def signals_dir(adapter, split: str, kind: str) -> Path:
    from edgeprune.models.dinov2_onnx import onnx_path

    if kind not in KINDS:
        raise EdgepruneError(f"kind {kind!r}, expected one of {', '.join(KINDS)}")
    sha = file_sha256(onnx_path())[:12]
    h, w = adapter.preprocess_config.size
    return cache_dir() / f"fmnist-{split}-{kind}-{h}x{w}-dinov2-{sha}"


def _write(path: Path, tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))


def cached_signals(adapter, split: str, indices, kind: str = "eval", data_dir=None, batch: int = 8,
                   load: bool = True) -> dict[str, Tensor]:
    """Signals of images `indices` of `split`, stacked [n, ...] in the order given (computed and
    cached for the ones missing). `load=False` only fills the cache."""
    from safetensors.torch import load_file

    indices = [int(i) for i in np.asarray(indices).reshape(-1)]
    folder = signals_dir(adapter, split, kind)
    folder.mkdir(parents=True, exist_ok=True)
    files = {i: folder / f"{i:05d}.safetensors" for i in indices}
    missing = [i for i in dict.fromkeys(indices) if not files[i].is_file()]
    if missing:
        images, _ = load_split(split, data_dir)
        start = time.time()
        for done in range(0, len(missing), batch):
            chunk = missing[done:done + batch]
            pixels = adapter.preprocess([images[i] for i in chunk])
            out = encode_full(adapter, pixels, need=KINDS[kind])
            for row, i in enumerate(chunk):
                item = {k: v[row].float() for k, v in out.items()}
                if kind == "train":
                    item["feats"] = item["feats"].half()
                _write(files[i], item)
            n = done + len(chunk)
            if n % (batch * 10) == 0 or n == len(missing):
                log.info("encoded %d/%d %s images (%.2f s/image)", n, len(missing), split, (time.time() - start) / n)
    if not load:
        return {}
    items = [load_file(str(files[i])) for i in indices]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}
