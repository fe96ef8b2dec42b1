"""SmolVLM (edgeprune/models/smolvlm.py) against transformers' own models: the packed layout of the processor's
image block (markers at exact positions), the pixel-shuffle grouping, K = N tokens equal to get_image_features,
prefill logits equal to the full forward on the processor's token layout, markers kept by every pruner,
Idefics3 directories, bad input."""
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
# [fake, row_1_col_1, 16 img, fake, row_1_col_2, 16 img, \n, fake, row_2_col_1, 16 img, fake, row_2_col_2, 16 img,
#  \n, \n, fake, global, 16 img, fake]
MARKERS = [0, 1, 18, 19, 36, 37, 38, 55, 56, 73, 74, 75, 76, 93]


@pytest.fixture(scope="module")
def hf():
    from edgeprune.models.smolvlm import tiny_smolvlm_model

    return tiny_smolvlm_model()[0]


@pytest.fixture(scope="module")
def adapter():
    from edgeprune.models import load

    return load("tiny-smolvlm")


@pytest.fixture(scope="module")
def pixels(adapter):
    return adapter.preprocess(seeded_images((128, 128), 2, seed=6))


def _hf_pixels(adapter, pixels):
    return adapter.views(pixels).reshape(pixels.shape[0], adapter.num_views, 3, 64, 64)


def test_layout(adapter):
    assert adapter.family == "smolvlm" and adapter.num_views == 5 and adapter.num_image_tokens == 94
    assert adapter.fixed_positions == MARKERS
    tok = adapter.tokenizer
    assert [tok.id_to_token(i) for i in adapter.fixed_ids[:2]] == ["<fake_token_around_image>", "<row_1_col_1>"]
    assert tok.id_to_token(adapter.fixed_ids[-2]) == "<global-img>"
    assert adapter.packed[4] == list(range(77, 93))                    # the global image comes last


def test_shuffle_groups_is_the_connector_pixel_shuffle(hf):
    x = torch.randn(2, 64, 3)
    assert torch.equal(shuffle_groups(x, (8, 8), 2).flatten(2), hf.model.connector.pixel_shuffle(x, 2))


@torch.no_grad()
def test_k_equals_n_equals_hf_image_features(adapter, hf, pixels):
    signals = adapter.encode(pixels)
    expected = hf.model.get_image_features(pixel_values=_hf_pixels(adapter, pixels)).pooler_output
    assert torch.allclose(signals.tokens, torch.stack(expected), atol=1e-6)
    assert torch.allclose(adapter.project(signals.feats), signals.tokens, atol=1e-6)
    tokens, positions = encode_and_prune(adapter, None, pixels)
    assert tokens.shape == (2, 94, 64) and torch.equal(positions, torch.arange(94).expand(2, 94))


@torch.no_grad()
def test_prefill_logits_equal_hf_forward(adapter, hf, pixels):
    """Our packed image block (view tokens + marker embeddings) equals the model on the processor's text."""
    from edgeprune.models.smolvlm import image_block

    prefix, suffix = encode_prompt(adapter.tokenizer, adapter.chat_template, PROMPT)
    block = adapter.tokenizer.encode(image_block(2, 2, 16), add_special_tokens=False).ids
    ids = torch.tensor([[*prefix, *block, *suffix]] * 2)
    expected = hf(input_ids=ids, pixel_values=_hf_pixels(adapter, pixels)).logits[:, -1]
    tokens, kept = encode_and_prune(adapter, None, pixels)
    embeds = torch.cat([adapter.embed(torch.tensor([prefix] * 2)), tokens, adapter.embed(torch.tensor([suffix] * 2))], 1)
    pos = sequence_positions(len(prefix), kept.numpy(), 94, len(suffix), "original")
    got = adapter.llm(inputs_embeds=embeds, position_ids=torch.from_numpy(pos)).logits[:, -1]
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize("method", ["dart", "visionzip"])
@torch.no_grad()
def test_markers_always_kept(adapter, pixels, method):
    pruner = adapter.build_pruner(method, 30)                          # 14 markers + 16 image tokens
    assert [p.keep for p in pruner.pruners] == [4, 3, 3, 3, 3] and pruner.keep == 30
    tokens, positions = encode_and_prune(adapter, pruner, pixels)
    markers = adapter.embed(torch.tensor([adapter.fixed_ids]))[0]
    for b, row in enumerate(positions.numpy()):
        assert (np.diff(row) > 0).all() and set(MARKERS) <= set(row.tolist())
        at = [row.tolist().index(p) for p in MARKERS]
        assert torch.equal(tokens[b, at], markers)


def test_one_tile_is_the_single_image_layout():
    from edgeprune.models.smolvlm import tiny_smolvlm

    one = tiny_smolvlm(tiles=(1, 1))
    assert one.num_views == 1 and one.num_image_tokens == 16 + 3            # fake, global, 16 images, fake
    assert one.fixed_positions == [0, 1, 18]


def test_bad_input(adapter, pixels):
    from edgeprune.models.smolvlm import tiny_smolvlm

    with pytest.raises(ModelError, match=r"tiles='2x2'"):
        tiny_smolvlm(tiles="2x2")
    with pytest.raises(ModelError, match=r"keep=14 .* the 14 marker tokens are always kept and each of the 5 views keeps at least one token; expected keep >= 19"):
        adapter.build_pruner("dart", 14)
    with pytest.raises(ModelError, match=r"pixels of shape"):
        adapter.encode(pixels[:, :, :64])


@pytest.mark.parametrize("model_type", ["idefics3", "smolvlm"])
def test_directory_round_trip(adapter, pixels, tmp_path, model_type):
    """Both published classes load from a directory by their config.json model_type, with the same tokens."""
    from transformers import PreTrainedTokenizerFast

    from edgeprune.models import load
    from edgeprune.models.smolvlm import tiny_smolvlm_model

    model, tokenizer = tiny_smolvlm_model(model_type=model_type)
    model.save_pretrained(tmp_path)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(tmp_path)
    loaded = load(tmp_path, tiles=(2, 2))
    assert type(loaded) is type(adapter) and loaded.num_image_tokens == 94
    assert loaded.preprocess_config == adapter.preprocess_config
    with torch.no_grad():
        assert torch.equal(loaded.encode(pixels, ("tokens",)).tokens, adapter.encode(pixels, ("tokens",)).tokens)
