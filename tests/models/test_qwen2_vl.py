"""Qwen2-VL and Qwen2.5-VL adapters (edgeprune/models/qwen2_vl.py, qwen2_5_vl.py) against transformers'
own models: the walked encoder equals the model's vision tower + merger (window attention included),
M-RoPE ids equal get_rope_index at K = N, the prefill logits equal the full model's forward, and K = N
pruned generation equals unpruned."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeprune.errors import EdgepruneError, ModelError
from edgeprune.export.validate import seeded_images
from edgeprune.pruners import build_for_model
from edgeprune.reference import encode_and_prune, generate
from edgeprune.runtime.positions import build_positions
from edgeprune.runtime.prompt import encode_prompt

PROMPT = "What is this?"


PRESETS = {"tiny-qwen2-vl": ("edgeprune.models.qwen2_vl", "tiny_qwen2_vl_model", "qwen2_vl"),
           "tiny-qwen2.5-vl": ("edgeprune.models.qwen2_5_vl", "tiny_qwen2_5_vl_model", "qwen2_5_vl")}


@pytest.fixture(scope="module", params=list(PRESETS))
def preset(request):
    return request.param


@pytest.fixture(scope="module")
def hf(preset):
    import importlib

    module, fn, _ = PRESETS[preset]
    return getattr(importlib.import_module(module), fn)()[0]


@pytest.fixture(scope="module")
def adapter(preset):
    from edgeprune.models import load

    return load(preset)


@pytest.fixture(scope="module")
def images():
    return seeded_images((168, 224), 2, seed=3)


def _hf_patches(pixels: torch.Tensor, patch: int = 14, merge: int = 2, temporal: int = 2) -> torch.Tensor:
    """[B, 3, H, W] -> the processor's flat patches [B * Np, 3 * T * P * P] (image_processing_pil_qwen2_vl)."""
    out = []
    for img in pixels:
        c, h, w = img.shape
        gh, gw = h // patch, w // patch
        p = img.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch).permute(1, 4, 2, 5, 0, 3, 6)
        p = p.unsqueeze(5).expand(*p.shape[:5], temporal, *p.shape[5:])
        out.append(p.reshape(gh * gw, c * temporal * patch * patch))
    return torch.cat(out)


def test_preset_shape(adapter, preset):
    assert adapter.family == PRESETS[preset][2] and adapter.rope == "mrope"
    assert adapter.grid == (6, 8) and adapter.num_image_tokens == 48
    assert adapter.default_positions == "original"


@torch.no_grad()
def test_encoder_equals_hf_vision_tower(adapter, hf, images):
    pixels = adapter.preprocess(images)
    signals = adapter.encode(pixels)
    thw = torch.tensor([[1, 12, 16]] * 2)
    expected = hf.model.visual(_hf_patches(pixels), grid_thw=thw).pooler_output.reshape(2, 48, -1)
    assert torch.allclose(signals.tokens, expected, atol=1e-5), (signals.tokens - expected).abs().max()
    # merged feats re-projected by the adapter give the same tokens (VisionZip merges in feats space)
    assert torch.allclose(adapter.project(signals.feats), signals.tokens, atol=1e-6)
    assert signals.keys.shape == (2, 48, 8) and signals.attn.shape == (2, 48)
    # mean received attention: each softmax row sums to 1, so over Np patches the mean sums to 1 and
    # the mean over the 4 patches of each group sums to 1/4
    assert torch.allclose(signals.attn.sum(-1), torch.full((2,), 0.25), atol=1e-5)


def _full_ids(adapter, k: int):
    prefix, suffix = encode_prompt(adapter.tokenizer, adapter.chat_template, PROMPT)
    pad = adapter.tokenizer.token_to_id("<|image_pad|>")
    return prefix, suffix, [*prefix, *[pad] * k, *suffix]


def test_positions_equal_get_rope_index_at_k_equals_n(adapter, hf):
    prefix, suffix, ids = _full_ids(adapter, 48)
    input_ids = torch.tensor([ids, ids])
    types = (input_ids == adapter.tokenizer.token_to_id("<|image_pad|>")).int()
    expected, _ = hf.model.get_rope_index(input_ids, mm_token_type_ids=types,
                                          image_grid_thw=torch.tensor([[1, 12, 16]] * 2))
    kept = np.tile(np.arange(48), (2, 1))
    ours = build_positions("mrope", len(prefix), kept, 48, adapter.grid, len(suffix), "original")
    np.testing.assert_array_equal(ours, expected.numpy())


@torch.no_grad()
def test_prefill_logits_equal_hf_forward(adapter, hf, images):
    """Our sequence (embeds + M-RoPE ids) through the adapter's LLM == the whole HF model on input_ids."""
    pixels = adapter.preprocess(images)
    prefix, suffix, ids = _full_ids(adapter, 48)
    input_ids = torch.tensor([ids, ids])
    types = (input_ids == adapter.tokenizer.token_to_id("<|image_pad|>")).int()
    expected = hf(input_ids=input_ids, pixel_values=_hf_patches(pixels), image_grid_thw=torch.tensor([[1, 12, 16]] * 2),
                  mm_token_type_ids=types).logits[:, -1]
    tokens, kept = encode_and_prune(adapter, None, pixels)
    embeds = torch.cat([adapter.embed(torch.tensor([prefix] * 2)), tokens, adapter.embed(torch.tensor([suffix] * 2))], 1)
    pos = build_positions("mrope", len(prefix), kept.numpy(), 48, adapter.grid, len(suffix), "original")
    got = adapter.llm(inputs_embeds=embeds, position_ids=torch.from_numpy(pos)).logits[:, -1]
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize("method", ["dart", "divprune", "visionzip"])
def test_k_equals_n_generation_equals_unpruned(adapter, images, method):
    full = generate(adapter, None, images, PROMPT, max_new_tokens=6)
    pruned = generate(adapter, build_for_model(method, 48, adapter.pruner_options()), images, PROMPT, max_new_tokens=6)
    assert pruned.ids == full.ids
    np.testing.assert_array_equal(pruned.position_ids, full.position_ids)
    assert full.position_ids.shape[0] == 3


def test_pruned_generation_keeps_grid_ids(adapter, images):
    res = generate(adapter, build_for_model("divprune", 12, adapter.pruner_options()), images, PROMPT,
                   max_new_tokens=3)
    prefix = len(res.prompt_ids[0])
    kept = res.image_positions                                              # [B, 12]
    image_ids = res.position_ids[:, :, prefix:prefix + 12]                  # [3, B, 12]
    np.testing.assert_array_equal(image_ids[1], prefix + kept // 8)
    np.testing.assert_array_equal(image_ids[2], prefix + kept % 8)
    assert (res.position_ids[:, :, prefix + 12] == prefix + 8).all()        # suffix from s + max(H, W)


def test_compact_positions_refused(adapter, images):
    with pytest.raises(EdgepruneError, match="M-RoPE"):
        generate(adapter, None, images[:1], PROMPT, max_new_tokens=1, positions="compact")


def test_qwen2_5_window_mask():
    """Windows of 3 x 3 merged tokens tiled on the 6 x 8 grid: 2 x 3 windows, the last column 2 wide."""
    from edgeprune.models.qwen2_5_vl import tiny_qwen2_5_vl

    adapter = tiny_qwen2_5_vl()
    assert adapter._block_mask(1, (12, 16)) is None                         # block 1 is a full-attention block
    mask = adapter._block_mask(0, (12, 16))                                 # [192, 192], merge-block patch order
    sizes = sorted(set(mask.sum(dim=1).tolist()))
    assert sizes == [24, 36] and mask.shape == (192, 192)                   # 3x2 and 3x3 merged tokens, x4 patches
    merged = lambda r, c: 4 * (r * 8 + c)                                   # first patch of merged token (r, c)
    assert mask[merged(0, 0), merged(2, 2)] and not mask[merged(0, 0), merged(0, 3)]
    assert mask[merged(3, 6), merged(5, 7)] and not mask[merged(2, 6), merged(3, 6)]


def test_bad_image_size():
    from edgeprune.models.qwen2_vl import tiny_qwen2_vl

    with pytest.raises(ModelError, match="multiple of patch"):
        tiny_qwen2_vl(image_size=(170, 224))


def test_directory_round_trip(hf, tmp_path, images, adapter, preset):
    """save_pretrained + tokenizer.json -> models.load(dir) at the same size gives the same tokens."""
    from transformers import PreTrainedTokenizerFast

    from edgeprune.models import load

    hf.save_pretrained(tmp_path)
    PreTrainedTokenizerFast(tokenizer_object=adapter.tokenizer).save_pretrained(tmp_path)
    loaded = load(tmp_path, image_size=(168, 224), chat_template=
                  "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n")
    assert loaded.grid == (6, 8) and type(loaded) is type(adapter)
    with torch.no_grad():
        pixels = adapter.preprocess(images)
        assert torch.allclose(loaded.encode(pixels, ("tokens",)).tokens, adapter.encode(pixels, ("tokens",)).tokens)


def test_text_only_prompt(adapter):
    res = generate(adapter, None, None, PROMPT, max_new_tokens=2)
    length = res.position_ids.shape[-1]
    np.testing.assert_array_equal(res.position_ids, np.tile(np.arange(length), (3, 1, 1)))


def test_text_lm_uses_the_current_cache_api(adapter, images, transformers_deprecations):
    generate(adapter, None, images[:1], PROMPT, max_new_tokens=3)     # prefill + 2 decode steps through Qwen2VLTextLM
    assert not [m for m in transformers_deprecations() if "past_key_values" in m or "deprecated" in m]
