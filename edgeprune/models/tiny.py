"""Tiny presets for tests: LLaVA-shaped models from transformers configs with seeded random
weights (the way transformers' own tests build models), created on the fly, no files.

"tiny-llava": CLIP vision 336 px / patch 14 (576 patches, [CLS]), 3 layers, hidden 64; MLP
projector; Llama LLM with 2 layers, hidden 64, grouped-query attention; a byte-level tokenizer
(256 bytes + <s>, </s>, <image>, <pad>) whose size is the LLM's vocab_size.
"""
from __future__ import annotations

import torch

from edgeprune.models.llava import CLIP_MEAN, CLIP_STD, LLAVA15_TEMPLATE, LlavaAdapter, split_template
from edgeprune.runtime.preprocess import PreprocessConfig

__all__ = ["tiny_llava", "tiny_llava_model", "byte_tokenizer", "BYTE_SPECIALS"]

BYTE_SPECIALS = ("<s>", "</s>", "<image>", "<pad>")   # ids 256, 257, 258, 259


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_tokenizer(specials: tuple[str, ...] = BYTE_SPECIALS):
    """A `tokenizers.Tokenizer`: byte-level BPE without merges (one token per byte, id = byte value),
    then `specials` (ids 256, 257, ...). Any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    assert tok.get_vocab_size() == 256 + len(specials)
    return tok


def tiny_llava_configs(image_size: int, llm_layers: int = 2):
    """(tokenizer, CLIP vision config, Llama text config, image token id) shared by the tiny LLaVA-shaped
    presets: CLIP at `image_size` / patch 14, 3 layers, hidden 64; Llama `llm_layers` layers (2), hidden 64."""
    from transformers import CLIPVisionConfig, LlamaConfig

    tokenizer = byte_tokenizer()
    bos, eos, image, pad = (tokenizer.token_to_id(t) for t in BYTE_SPECIALS)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                              image_size=image_size, patch_size=14, projection_dim=64)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=llm_layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=2048,
                       bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False,
                       initializer_range=0.1)  # wider logits than 0.02: fewer near-ties between torch and ORT
    return tokenizer, vision, text, image


def seeded_model(model_class, config, seed: int, dtype: torch.dtype):
    """`model_class(config)` with seeded random weights (the caller's RNG untouched), in eval mode."""
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):   # seeded without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = model_class(config).to(dtype)
    with torch.no_grad():
        # EOS must not win by construction at step 1 (tests compare 16 new tokens): its logit is 0
        # while the other rows are random, so EOS would need every other logit to be negative.
        model.lm_head.weight[config.text_config.eos_token_id].zero_()
    return model.eval()


def tiny_llava_model(seed: int = 0, dtype: torch.dtype = torch.float32, llm_layers: int = 2):
    """(LlavaForConditionalGeneration, tokenizers.Tokenizer) of the "tiny-llava" preset; tests save
    it with save_pretrained to check that a LLaVA directory loads. `llm_layers`: deeper LLMs for
    multi-stage in-LLM pruning tests."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tokenizer, vision, text, image = tiny_llava_configs(336, llm_layers)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    return seeded_model(LlavaForConditionalGeneration, config, seed, dtype), tokenizer


def tiny_llava(seed: int = 0, dtype: torch.dtype = torch.float32, llm_layers: int = 2) -> LlavaAdapter:
    """The "tiny-llava" preset. Same seed, same weights."""
    model, tokenizer = tiny_llava_model(seed, dtype, llm_layers)
    preprocess = PreprocessConfig(size=(336, 336), mean=CLIP_MEAN, std=CLIP_STD, shortest_edge=336,
                                  resample="bicubic")
    eos = tokenizer.token_to_id("</s>")
    return LlavaAdapter(model, tokenizer, preprocess, split_template(LLAVA15_TEMPLATE), (eos,), name="tiny-llava")
