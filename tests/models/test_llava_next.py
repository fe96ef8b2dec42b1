"""LLaVA-NeXT anyres (edgeprune/models/llava_next.py): the budget split across views (by hand), the
packed layout with newline tokens, K = N equal to transformers' own packed image features and to its
full forward, and the per-view pruner's output (K tokens, every newline kept, ascending positions)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeprune.errors import ModelError
from edgeprune.export.validate import seeded_images
from edgeprune.models.llava_next import split_budget
from edgeprune.reference import encode_and_prune
from edgeprune.runtime.positions import sequence_positions
from edgeprune.runtime.prompt import encode_prompt

NEWLINES = [64 + 17 * r + 16 for r in range(16)]   # after each of the 16 rows of the 2x2-crop grid (16 x 16)


@pytest.fixture(scope="module")
def hf():
    from edgeprune.models.llava_next import tiny_llava_next_model

    return tiny_llava_next_model()[0]


@pytest.fixture(scope="module")
def adapter():
    from edgeprune.models import load

    return load("tiny-llava-next")


@pytest.fixture(scope="module")
def pixels(adapter):
    return adapter.preprocess(seeded_images((224, 224), 2, seed=2))


def test_split_budget_by_hand():
    assert split_budget(84, [64] * 5) == [17, 17, 17, 17, 16]       # equal views: the earlier get the extra
    assert split_budget(10, [6, 3, 1]) == [6, 3, 1]
    assert split_budget(7, [6, 3, 1]) == [4, 2, 1]                   # floors 4, 2, 0; largest remainder 7/10 -> view 2
    assert split_budget(8, [6, 3, 1]) == [5, 2, 1]                   # floors 4, 2, 0; remainders 8, 4, 8 -> views 0, 2
    for keep in range(5, 321, 37):
        assert sum(split_budget(keep, [64] * 5)) == keep
    with pytest.raises(ModelError, match="keep=4"):
        split_budget(4, [64] * 5)
    with pytest.raises(ModelError, match="view 2 gets 0"):
        split_budget(5, [6, 3, 1])                                   # remainders 0, 5, 5: the tie goes to view 1


def test_packed_layout(adapter):
    assert adapter.num_views == 5 and adapter.grid == (8, 8)
    assert adapter.num_image_tokens == 64 + 16 * 17
    assert adapter.newline_positions == NEWLINES
    assert adapter.packed[0][:3] == [0, 1, 2]                         # base view first
    assert adapter.packed[2][0] == 64 + 8                             # crop (0, 1), token (0, 0): row 0, column 8
    assert adapter.packed[3][0] == 64 + 8 * 17                        # crop (1, 0), token (0, 0): row 8
    every = sorted([p for view in adapter.packed for p in view] + NEWLINES)
    assert every == list(range(adapter.num_image_tokens))


@torch.no_grad()
def test_k_equals_n_equals_hf_packed_features(adapter, hf, pixels):
    tokens, positions = encode_and_prune(adapter, adapter.build_pruner("divprune", 336), pixels)
    views = adapter.views(pixels).reshape(2, 5, 3, 112, 112)
    packed = hf.model.get_image_features(pixel_values=views, image_sizes=torch.tensor([[224, 224]] * 2)).pooler_output
    assert torch.allclose(tokens, torch.stack(list(packed)), atol=1e-6)
    assert torch.equal(positions, torch.arange(336).expand(2, 336))


@torch.no_grad()
def test_k_equals_n_prefill_equals_hf_forward(adapter, hf, pixels):
    prefix, suffix = encode_prompt(adapter.tokenizer, adapter.chat_template, "What is it?")
    image = adapter.tokenizer.token_to_id("<image>")
    ids = torch.tensor([[*prefix, *[image] * 336, *suffix]] * 2)
    expected = hf(input_ids=ids, pixel_values=adapter.views(pixels).reshape(2, 5, 3, 112, 112),
                  image_sizes=torch.tensor([[224, 224]] * 2)).logits[:, -1]
    tokens, kept = encode_and_prune(adapter, adapter.build_pruner("dart", 336), pixels)
    embeds = torch.cat([adapter.embed(torch.tensor([prefix] * 2)), tokens, adapter.embed(torch.tensor([suffix] * 2))], 1)
    pos = sequence_positions(len(prefix), kept.numpy(), 336, len(suffix), "original")
    got = adapter.llm(inputs_embeds=embeds, position_ids=torch.from_numpy(pos)).logits[:, -1]
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize("method", ["dart", "divprune", "visionzip"])
@torch.no_grad()
def test_view_pruner_output(adapter, pixels, method):
    pruner = adapter.build_pruner(method, 100)
    assert [p.keep for p in pruner.pruners] == [17, 17, 17, 17, 16] and pruner.keep == 100
    tokens, positions = encode_and_prune(adapter, pruner, pixels)
    assert tokens.shape == (2, 100, 64) and positions.shape == (2, 100)
    for row in positions.numpy():
        assert (np.diff(row) > 0).all() and set(NEWLINES) <= set(row.tolist())
        assert (row < 64).sum() == 17                                # the base view's share
    newline = adapter.newline.detach()
    at = [list(positions[0].numpy()).index(p) for p in NEWLINES]
    assert torch.equal(tokens[0, at], newline.expand(16, -1))


@pytest.mark.parametrize("method", ["dart", "visionzip"])
def test_k_equals_n_generation_equals_unpruned(adapter, method):
    from edgeprune.reference import generate

    images = seeded_images((224, 224), 2, seed=4)
    full = generate(adapter, None, images, "What is it?", max_new_tokens=6, positions="original")
    pruned = generate(adapter, adapter.build_pruner(method, 336), images, "What is it?", max_new_tokens=6,
                      positions="original")
    assert pruned.ids == full.ids and full.num_image_tokens == 336
    np.testing.assert_array_equal(pruned.position_ids, full.position_ids)


def test_build_pruner_errors(adapter):
    with pytest.raises(ModelError, match="keep >= 21"):
        adapter.build_pruner("dart", 16)
    with pytest.raises(ModelError, match="extra graph outputs"):
        adapter.build_pruner("adbts", 100)
