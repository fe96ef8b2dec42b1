"""Fashion-MNIST as prompt/answer pairs: the offline, real-image data of the fidelity evaluation.

The Debian package `dataset-fashion-mnist` installs the four IDX gz files under
/usr/share/datasets/fashion-mnist/ (60k train, 10k test, 28x28 grey, 10 classes). The images go
through the adapter's own preprocessing (grey -> RGB, bicubic upscale to the encoder size).
Training (scripts/align_mini_projector.py) uses the train split; every evaluation uses the test
split, so evaluation images are held out.
"""
from __future__ import annotations

import gzip
import os
import re
import struct
from pathlib import Path

import numpy as np

from edgeprune.errors import EdgepruneError

__all__ = ["DEFAULT_DATA_DIR", "CLASSES", "PROMPT", "read_idx", "load_split", "data_available",
           "normalize_answer", "match_class", "eval_indices"]

DEFAULT_DATA_DIR = Path(os.environ.get("EDGEPRUNE_FMNIST", "/usr/share/datasets/fashion-mnist"))
# the answer each label is trained to produce; matching is case- and punctuation-insensitive
CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
PROMPT = "What item of clothing is this?"
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzip or raw; the MNIST format: magic 0x00 0x00 type ndim, big-endian dims) -> array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise EdgepruneError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()}, expected 000008xx)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise EdgepruneError(f"{path}: {data.size} bytes of data, expected {int(np.prod(dims))} for dims {dims}")
    return data.reshape(dims)


def data_available(data_dir: Path | str | None = None) -> bool:
    d = Path(data_dir) if data_dir else DEFAULT_DATA_DIR
    return all((d / name).is_file() for names in _FILES.values() for name in names)


def load_split(split: str, data_dir: Path | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 28, 28], labels int64 [n]) of the "train" or "test" split."""
    if split not in _FILES:
        raise EdgepruneError(f"split {split!r}, expected one of {', '.join(_FILES)}")
    d = Path(data_dir) if data_dir else DEFAULT_DATA_DIR
    images_file, labels_file = (d / name for name in _FILES[split])
    if not images_file.is_file() or not labels_file.is_file():
        raise EdgepruneError(f"Fashion-MNIST not found in {d} (expected {images_file.name}, {labels_file.name}); "
                             "install the Debian package dataset-fashion-mnist or pass --data DIR")
    images, labels = read_idx(images_file), read_idx(labels_file).astype(np.int64)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise EdgepruneError(f"{d}: images {images.shape} and labels {labels.shape} do not pair up")
    return images, labels


def normalize_answer(text: str) -> str:
    """Lower case, no leading article, letters/digits/spaces only, single spaces."""
    text = re.sub(r"[^a-z0-9 ]+", " ", text.lower())
    text = re.sub(r"^\s*(a|an|the|this is a|this is an|it is a|it is an|it's a|it's an)\s+", "", text)
    return " ".join(text.split())


_NORMALIZED = [normalize_answer(c) for c in CLASSES]


def match_class(text: str) -> int:
    """Index of the class the answer names exactly (after normalisation), else -1. Exact match:
    "Sneaker." and "a sneaker" count, "a white sneaker" does not."""
    norm = normalize_answer(text)
    return _NORMALIZED.index(norm) if norm in _NORMALIZED else -1


def eval_indices(n: int, seed: int = 0, total: int = 10_000) -> np.ndarray:
    """The first `n` test-split indices of a seeded permutation: the evaluation subset (sorted)."""
    if not 1 <= n <= total:
        raise EdgepruneError(f"n={n}: expected 1 <= n <= {total}")
    return np.sort(np.random.default_rng(seed).permutation(total)[:n])
