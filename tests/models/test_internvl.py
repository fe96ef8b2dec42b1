"""InternVL (edgeprune/models/internvl.py) against transformers' own model: the pixel-shuffle grouping, K = N
image tokens equal to get_image_features on the same tiles, prefill logits equal to the full forward, the
[CLS]-attention signal by hand from the eager attention weights, the per-tile budget split, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeprune.errors import ModelError
from edgeprune.export.validate import seeded_images
from edgeprune.models._vit import shuffle_groups
from edgeprune.reference import encode_and_prune
from edgeprune.runtime.positions import sequence_positions
from edgeprune.runtime.prompt import encode_prompt

PROMPT = "What is it?"


@pytest.fixture(scope="module")
def hf():
    from edgeprune.models.internvl import tiny_internvl_model

    return tiny_internvl_model()[0]


@pytest.fixture(scope="module")
def adapter():
    from edgeprune.models import load

    return load("tiny-internvl")


@pytest.fixture(scope="module")
def pixels(adapter):
    return adapter.preprocess(seeded_images((224, 224), 2, seed=5))


def test_layout(adapter):
    assert adapter.family == "internvl" and adapter.num_views == 5 and adapter.grid == (4, 4)
    assert adapter.num_image_tokens == 80 and adapter.fixed_positions == []
    assert adapter.packed[4] == list(range(64, 80))                   # the thumbnail comes last


def test_shuffle_groups_is_internvl_pixel_shuffle(hf):
    x = torch.randn(2, 8, 8, 3)
    expected = hf.model.pixel_shuffle(x, 0.5).reshape(2, 16, 12)
    assert torch.equal(shuffle_groups(x.reshape(2, 64, 3), (8, 8), 2).reshape(2, 16, 12), expected)


@torch.no_grad()
def test_k_equals_n_equals_hf_image_features(adapter, hf, pixels):
    tokens, positions = encode_and_prune(adapter, adapter.build_pruner("dart", 80), pixels)
    expected = hf.model.get_image_features(pixel_values=adapter.views(pixels)).pooler_output   # [B*V, 16, D]
    assert torch.allclose(tokens, expected.reshape(2, 80, -1), atol=1e-6)
    assert torch.equal(positions, torch.arange(80).expand(2, 80))
    signals = adapter.encode(pixels)
    assert torch.allclose(adapter.project(signals.feats), signals.tokens, atol=1e-6)


@torch.no_grad()
def test_prefill_logits_equal_hf_forward(adapter, hf, pixels):
    prefix, suffix = encode_prompt(adapter.tokenizer, adapter.chat_template, PROMPT)
    assert adapter.tokenizer.decode(prefix[-1:], skip_special_tokens=False) == "<img>"
    context = adapter.tokenizer.token_to_id("<IMG_CONTEXT>")
    ids = torch.tensor([[*prefix, *[context] * 80, *suffix]] * 2)
    expected = hf(input_ids=ids, pixel_values=adapter.views(pixels)).logits[:, -1]
    tokens, kept = encode_and_prune(adapter, None, pixels)
    embeds = torch.cat([adapter.embed(torch.tensor([prefix] * 2)), tokens, adapter.embed(torch.tensor([suffix] * 2))], 1)
    pos = sequence_positions(len(prefix), kept.numpy(), 80, len(suffix), "original")
    got = adapter.llm(inputs_embeds=embeds, position_ids=torch.from_numpy(pos)).logits[:, -1]
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


@torch.no_grad()
def test_attn_is_cls_attention_averaged_over_the_shuffle_group(adapter, hf, pixels):
    """attn = the last layer's [CLS] row (summed over heads) of the eager attention weights, mean over 2 x 2."""
    tower = hf.model.vision_tower
    tower.config._attn_implementation = "eager"
    try:
        out = tower(pixel_values=adapter.views(pixels)[:1], output_attentions=True)
    finally:
        tower.config._attn_implementation = "sdpa"
    cls_row = out.attentions[-1][:, :, 0, 1:].sum(dim=1)                         # [1, 64]
    expected = shuffle_groups(cls_row.unsqueeze(-1), (8, 8), 2).mean(dim=(2, 3))  # [1, 16]
    got = adapter.encode(pixels, ("attn",)).attn[:1, :16]                        # the first tile of image 0
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("method", ["dart", "visionzip"])
@torch.no_grad()
def test_tile_pruner_splits_the_budget(adapter, pixels, method):
    pruner = adapter.build_pruner(method, 22)
    assert [p.keep for p in pruner.pruners] == [5, 5, 4, 4, 4] and pruner.keep == 22
    tokens, positions = encode_and_prune(adapter, pruner, pixels)
    assert tokens.shape == (2, 22, 64)
    for row in positions.numpy():
        assert (np.diff(row) > 0).all()
        assert [int(((row >= 16 * v) & (row < 16 * (v + 1))).sum()) for v in range(5)] == [5, 5, 4, 4, 4]


def test_one_tile_has_no_thumbnail():
    from edgeprune.models.internvl import tiny_internvl

    one = tiny_internvl(tiles=(1, 1))
    assert one.num_views == 1 and one.num_image_tokens == 16 and one.preprocess_config.size == (112, 112)


def test_bad_input(adapter, pixels):
    from edgeprune.models.internvl import tiny_internvl

    with pytest.raises(ModelError, match=r"tiles=\(0, 2\)"):
        tiny_internvl(tiles=(0, 2))
    with pytest.raises(ModelError, match=r"pixels of shape \(2, 3, 112, 112\), expected \[B, 3, 224, 224\]"):
        adapter.encode(pixels[:, :, :112, :112])
    with pytest.raises(ModelError, match="keep=4 .* each of the 5 views keeps at least one token; expected keep >= 5"):
        adapter.build_pruner("dart", 4)


def test_directory_round_trip(hf, adapter, pixels, tmp_path):
    """save_pretrained + tokenizer.json -> models.load(dir) recognises the family and gives the same tokens."""
    from transformers import PreTrainedTokenizerFast

    from edgeprune.models import load
    from edgeprune.models.internvl import TINY_TEMPLATE

    hf.save_pretrained(tmp_path)
    PreTrainedTokenizerFast(tokenizer_object=adapter.tokenizer).save_pretrained(tmp_path)
    loaded = load(tmp_path, chat_template=TINY_TEMPLATE)
    assert type(loaded) is type(adapter) and loaded.num_image_tokens == 80
    with torch.no_grad():
        assert torch.equal(loaded.encode(pixels, ("tokens",)).tokens, adapter.encode(pixels, ("tokens",)).tokens)
