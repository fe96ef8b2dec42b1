"""Qwen3-VL (edgeprune/models/qwen3_vl.py) against transformers' own model: the walked encoder (learned position
table, merger) and its DeepStack features equal the vision tower's, M-RoPE ids equal get_rope_index, prefill
logits (DeepStack included) equal the full forward, and pruning carries exactly the kept tokens' DeepStack
features: a gathered token keeps its own, a merged token gets the same mean of its members'."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeprune.export.validate import seeded_images
from edgeprune.reference import encode_prune_deepstack, generate
from edgeprune.runtime.positions import build_positions
from edgeprune.runtime.prompt import encode_prompt

PROMPT = "What is this?"
THW = [[1, 12, 16]] * 2


@pytest.fixture(scope="module")
def hf():
    from edgeprune.models.qwen3_vl import tiny_qwen3_vl_model

    return tiny_qwen3_vl_model()[0]


@pytest.fixture(scope="module")
def adapter():
    from edgeprune.models import load

    return load("tiny-qwen3-vl")


@pytest.fixture(scope="module")
def pixels(adapter):
    return adapter.preprocess(seeded_images((192, 256), 2, seed=3))


def _hf_patches(pixels: torch.Tensor) -> torch.Tensor:
    """The processor's flat patches at Qwen3-VL's patch size 16 (test_qwen2_vl's helper)."""
    from tests.models.test_qwen2_vl import _hf_patches as qwen2_patches

    return qwen2_patches(pixels, patch=16)


@pytest.fixture(scope="module")
def hf_vision(hf, pixels):
    with torch.no_grad():
        return hf.model.visual(_hf_patches(pixels), grid_thw=torch.tensor(THW))


def test_preset_shape(adapter):
    assert adapter.family == "qwen3_vl" and adapter.rope == "mrope" and adapter.default_positions == "original"
    assert adapter.grid == (6, 8) and adapter.num_image_tokens == 48 and adapter.deepstack_layers == 2


@torch.no_grad()
def test_encoder_and_deepstack_equal_hf_vision_tower(adapter, pixels, hf_vision):
    tokens, positions, deepstack = encode_prune_deepstack(adapter, None, pixels)
    assert torch.allclose(tokens, hf_vision.pooler_output.reshape(2, 48, -1), atol=1e-5)
    assert deepstack.shape == (2, 48, 2, 64) and torch.equal(positions, torch.arange(48).expand(2, 48))
    for i, feature in enumerate(hf_vision.deepstack_features):
        assert torch.allclose(deepstack[:, :, i], feature.reshape(2, 48, -1), atol=1e-5)


def test_positions_equal_get_rope_index(adapter, hf):
    prefix, suffix = encode_prompt(adapter.tokenizer, adapter.chat_template, PROMPT)
    pad = adapter.tokenizer.token_to_id("<|image_pad|>")
    input_ids = torch.tensor([[*prefix, *[pad] * 48, *suffix]] * 2)
    expected, _ = hf.model.get_rope_index(input_ids, mm_token_type_ids=(input_ids == pad).int(),
                                          image_grid_thw=torch.tensor(THW))
    ours = build_positions("mrope", len(prefix), np.tile(np.arange(48), (2, 1)), 48, adapter.grid, len(suffix),
                           "original")
    np.testing.assert_array_equal(ours, expected.numpy())


@torch.no_grad()
def test_prefill_logits_equal_hf_forward(adapter, hf, pixels):
    """Our sequence (embeds, M-RoPE ids, DeepStack at the image positions) == the whole model on input_ids."""
    prefix, suffix = encode_prompt(adapter.tokenizer, adapter.chat_template, PROMPT)
    pad = adapter.tokenizer.token_to_id("<|image_pad|>")
    input_ids = torch.tensor([[*prefix, *[pad] * 48, *suffix]] * 2)
    expected = hf(input_ids=input_ids, pixel_values=_hf_patches(pixels), image_grid_thw=torch.tensor(THW),
                  mm_token_type_ids=(input_ids == pad).int()).logits[:, -1]
    tokens, kept, deepstack = encode_prune_deepstack(adapter, None, pixels)
    embeds = torch.cat([adapter.embed(torch.tensor([prefix] * 2)), tokens, adapter.embed(torch.tensor([suffix] * 2))], 1)
    pos = torch.from_numpy(build_positions("mrope", len(prefix), kept.numpy(), 48, adapter.grid, len(suffix), "original"))
    dense = torch.zeros(2, embeds.shape[1], 2, 64)
    dense[:, len(prefix):len(prefix) + 48] = deepstack
    got = adapter.llm(inputs_embeds=embeds, position_ids=pos, deepstack_embeds=dense).logits[:, -1]
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    without = adapter.llm(inputs_embeds=embeds, position_ids=pos).logits[:, -1]
    assert not torch.allclose(without, expected, atol=1e-3)                  # DeepStack matters here


@torch.no_grad()
def test_selection_keeps_the_kept_tokens_deepstack(adapter, pixels, hf_vision):
    _, kept, deepstack = encode_prune_deepstack(adapter, adapter.build_pruner("dart", 12), pixels)
    for i, feature in enumerate(hf_vision.deepstack_features):
        full = feature.reshape(2, 48, -1)
        expected = torch.stack([full[b, kept[b]] for b in range(2)])           # same gather, same order
        assert torch.allclose(deepstack[:, :, i], expected, atol=1e-5)


@torch.no_grad()
def test_merged_tokens_get_the_same_merge(adapter, pixels):
    """visionzip: a contextual token's DeepStack features = the DeepStack mergers of the mean of its members'
    tapped features, the members and weights of its `feats` merge; dominant tokens keep their own."""
    pruner = adapter.build_pruner("visionzip", 12)
    signals = adapter.encode(pixels, ("feats", "keys", "attn"))
    sel = pruner(**signals.as_kwargs())
    deepstack = adapter.deepstack(signals, sel, pruner)                        # [B, 12, 2, 64]
    full = adapter.project_deepstack(signals.carry)                            # [B, 48, 2, 64] every token's own
    merged_rows = 0
    for b in range(2):
        for k in range(12):
            members = torch.nonzero(sel.weights[b, k]).flatten()
            if len(members) == 1:
                assert members.item() == sel.positions[b, k] and torch.allclose(deepstack[b, k], full[b, members[0]])
            else:
                merged_rows += 1
                mean = signals.carry[b, members].mean(dim=0, keepdim=True)     # [1, 2, 4C] same members, same mean
                assert torch.allclose(deepstack[b, k], adapter.project_deepstack(mean.unsqueeze(0))[0, 0], atol=1e-5)
                assert torch.allclose(sel.tokens[b, k], signals.feats[b, members].mean(dim=0), atol=1e-5)
    assert merged_rows > 0


@pytest.mark.parametrize("method", ["dart", "visionzip"])
def test_k_equals_n_generation_equals_unpruned(adapter, pixels, method):
    images = seeded_images((192, 256), 2, seed=4)
    full = generate(adapter, None, images, PROMPT, max_new_tokens=5)
    pruned = generate(adapter, adapter.build_pruner(method, 48), images, PROMPT, max_new_tokens=5)
    assert pruned.ids == full.ids
