"""Training data: the JSONL format and loader, the offline builders, and the batch source."""
from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from edgeprune.errors import EdgepruneError
from edgeprune.train.data import (FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FASHION_PROMPT, ExampleBatches,
                                  answer_ids, load_examples, read_idx, write_fashion_mnist, write_skimage_dataset)


def write_png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)
    return path


def test_load_examples_resolves_relative_paths(tmp_path):
    write_png(tmp_path / "img" / "a.png")
    absolute = write_png(tmp_path / "elsewhere" / "b.png")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"image": "img/a.png", "prompt": "What?", "answer": "A", "id": 3}) + "\n\n"
                    + json.dumps({"image": str(absolute), "prompt": "Q", "answer": "B"}) + "\n")
    examples = load_examples(data)
    assert [e.image for e in examples] == [tmp_path / "img" / "a.png", absolute]
    assert [(e.prompt, e.answer) for e in examples] == [("What?", "A"), ("Q", "B")]


@pytest.mark.parametrize("line,message", [
    ("{not json", r"data.jsonl:2: not JSON"),
    ('["a"]', r"data.jsonl:2: a list, expected an object"),
    ('{"image": "a.png", "prompt": "q"}', r"data.jsonl:2: 'answer' is None, expected a non-empty string"),
    ('{"image": "a.png", "prompt": "", "answer": "x"}', r"'prompt' is '', expected a non-empty string"),
    ('{"image": "missing.png", "prompt": "q", "answer": "x"}', r"data.jsonl:2: image .*missing.png does not exist"),
])
def test_load_examples_errors_name_file_and_line(tmp_path, line, message):
    write_png(tmp_path / "a.png")
    data = tmp_path / "data.jsonl"
    data.write_text('{"image": "a.png", "prompt": "q", "answer": "x"}\n' + line + "\n")
    with pytest.raises(EdgepruneError, match=message):
        load_examples(data)


def test_load_examples_missing_or_empty(tmp_path):
    with pytest.raises(EdgepruneError, match="no such file"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(EdgepruneError, match="no examples"):
        load_examples(tmp_path / "empty.jsonl")


def test_skimage_dataset(tmp_path):
    examples = load_examples(write_skimage_dataset(tmp_path))
    assert len(examples) >= 10
    answers = {e.image.name: e.answer for e in examples}
    assert answers["chelsea.png"] == "a cat" and answers["astronaut.png"] == "an astronaut"


def idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def test_read_idx_gzip_and_raw(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(a)))
    (tmp_path / "a.idx").write_bytes(idx_bytes(a))
    assert np.array_equal(read_idx(tmp_path / "a.gz"), a) and np.array_equal(read_idx(tmp_path / "a.idx"), a)
    (tmp_path / "bad.idx").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(EdgepruneError, match="not an unsigned-byte IDX file"):
        read_idx(tmp_path / "bad.idx")
    (tmp_path / "short.idx").write_bytes(idx_bytes(a)[:-3])
    with pytest.raises(EdgepruneError, match="21 bytes of data, expected 24"):
        read_idx(tmp_path / "short.idx")


def test_fashion_mnist_builder_on_handmade_idx(tmp_path):
    root = tmp_path / "fm"
    root.mkdir()
    images = np.stack([np.full((28, 28), v, dtype=np.uint8) for v in (0, 100, 200)])
    labels = np.array([9, 0, 3], dtype=np.uint8)
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    examples = load_examples(write_fashion_mnist(tmp_path / "out", split="test", limit=2, root=root))
    assert [e.answer for e in examples] == ["Ankle boot", "T-shirt"]
    assert all(e.prompt == FASHION_PROMPT for e in examples)
    assert np.array_equal(np.asarray(Image.open(examples[1].image)), images[1])
    with pytest.raises(EdgepruneError, match="Fashion-MNIST not found .*install the Debian package dataset-fashion-mnist"):
        write_fashion_mnist(tmp_path / "out", split="train", root=root)
    with pytest.raises(EdgepruneError, match="split 'val'"):
        write_fashion_mnist(tmp_path / "out", split="val", root=root)


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_real_files(tmp_path):
    examples = load_examples(write_fashion_mnist(tmp_path, split="train", limit=5))
    # the first five training labels of Fashion-MNIST are 9, 0, 0, 3, 0
    assert [e.answer for e in examples] == [FASHION_MNIST_CLASSES[i] for i in (9, 0, 0, 3, 0)]
    assert Image.open(examples[0].image).size == (28, 28)


class FakeAdapter:
    """Just what ExampleBatches reads: tokenizer, chat template, EOS, preprocess, encode (counted)."""

    def __init__(self):
        from edgeprune.models.tiny import byte_tokenizer
        from edgeprune.runtime.prompt import ChatTemplate

        self.tokenizer = byte_tokenizer()
        self.chat_template = ChatTemplate(prefix="<s>U: ", suffix="{prompt} A:")
        self.eos_token_ids = (257,)
        self.encoded = []

    def preprocess(self, paths):
        self.encoded += paths
        return torch.stack([torch.full((3, 2, 2), float(np.asarray(Image.open(p))[0, 0, 0])) for p in paths])

    def encode(self, pixels, need):
        from types import SimpleNamespace

        return SimpleNamespace(feats=pixels.flatten(1).unsqueeze(-1).repeat(1, 1, 2))   # [B, 12, 2]


def test_answer_ids_space_and_eos():
    from edgeprune.models.tiny import byte_tokenizer

    tok = byte_tokenizer()
    assert answer_ids(tok, "{prompt} A:", "cat", eos=257) == [32, 99, 97, 116, 257]
    assert answer_ids(tok, "{prompt}\n", "cat", eos=None) == [99, 97, 116]


def test_example_batches(tmp_path):
    rows = [{"image": str(write_png(tmp_path / f"{i}.png", value=10 * i)), "prompt": "hi", "answer": f"a{i}"}
            for i in range(5)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_examples(tmp_path / "d.jsonl")
    adapter = FakeAdapter()
    batches = ExampleBatches(adapter, examples, batch_size=2, seed=3)
    seen = [i for step in range(5) for i in batches.indices(step)]
    assert sorted(seen[:5]) == list(range(5)) and sorted(seen[5:]) == list(range(5))  # each epoch a permutation
    assert seen == [i for step in range(5) for i in ExampleBatches(adapter, examples, 2, seed=3).indices(step)]
    assert seen != [i for step in range(5) for i in ExampleBatches(adapter, examples, 2, seed=4).indices(step)]
    b = batches(0)
    i0 = b.meta["indices"][0]
    assert b.feats.shape == (2, 12, 2) and float(b.feats[0, 0, 0]) == 10 * i0
    assert b.prefix[0] == [256, 85, 58, 32]                      # "<s>" special, then "U: "
    assert b.suffix[0] == [104, 105, 32, 65, 58]                 # "hi A:"
    assert b.answer[0] == [32, 97, 48 + i0, 257]                 # " a<i>" + EOS
    for step in range(5):
        batches(step)
    assert len(adapter.encoded) == 5                             # each image encoded once (cached)
