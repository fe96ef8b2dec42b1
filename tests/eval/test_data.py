"""Fashion-MNIST reader and answer matching (eval/data.py)."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from edgeprune.errors import EdgepruneError
from edgeprune.eval.data import CLASSES, data_available, eval_indices, load_split, match_class, normalize_answer, read_idx


def _write_idx(path, array: np.ndarray, gz: bool = True):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_read_idx_hand_made(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "x.gz", images)
    _write_idx(tmp_path / "y", np.array([7, 2], dtype=np.uint8), gz=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "y"), [7, 2])


def test_read_idx_rejects_bad_magic_and_size(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(EdgepruneError, match="not an unsigned-byte IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"\x01\x02")
    with pytest.raises(EdgepruneError, match="2 bytes of data, expected 5"):
        read_idx(tmp_path / "short")


def test_load_split_from_folder(tmp_path):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28), dtype=np.uint8))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 9, 4], dtype=np.uint8))
    images, labels = load_split("test", tmp_path)
    assert images.shape == (3, 28, 28) and labels.tolist() == [0, 9, 4] and labels.dtype == np.int64
    with pytest.raises(EdgepruneError, match="not found"):
        load_split("train", tmp_path)
    with pytest.raises(EdgepruneError, match="split 'val'"):
        load_split("val", tmp_path)


@pytest.mark.skipif(not data_available(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    images, labels = load_split("test")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert sorted(set(labels.tolist())) == list(range(10))
    assert labels[:5].tolist() == [9, 2, 1, 1, 6]      # the published first test labels


@pytest.mark.parametrize("text, expected", [
    ("Sneaker", 7), ("sneaker.", 7), ("A sneaker", 7), ("T-shirt", 0), ("t shirt!", 0), ("Ankle boot", 9),
    ("ankle-boot", 9), ("Shirt", 6), ("a white sneaker", -1), ("", -1), ("Trousers", -1), ("This is a bag.", 8),
])
def test_match_class_exact(text, expected):
    assert match_class(text) == expected


def test_normalize_answer():
    assert normalize_answer("  The  Coat. ") == "coat"
    assert len({normalize_answer(c) for c in CLASSES}) == 10


def test_eval_indices_seeded_sorted_distinct():
    a, b, c = eval_indices(50, 0), eval_indices(50, 0), eval_indices(50, 1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert (np.diff(a) > 0).all() and a.min() >= 0 and a.max() < 10_000
    with pytest.raises(EdgepruneError, match="n=0"):
        eval_indices(0)
