"""The torch reference pipeline: the exported runtime is compared with this, token for token.

images -> adapter.preprocess -> the vision step (models/vision_step.py, the exported graph's own code:
encode -> pruner -> project if the pruner works on `feats`) -> [prefix ids, K image tokens, suffix ids]
(runtime.prompt.encode_prompt) -> embeddings
-> position ids (runtime.positions.build_positions, the runtime's own rule: [B, L] for 1-D RoPE,
[3, B, L] for M-RoPE) -> prefill of the
HF causal LM (inputs_embeds, explicit position_ids, all-ones attention mask, a DynamicCache passed as
`cache=`: transformers 5.24 deprecates the `past_key_values` name, removed in 5.40; for DeepStack models the
kept tokens' DeepStack features at the image positions, zeros elsewhere, as the runtime feeds them) ->
greedy or top-p decode with the KV cache (runtime.sampling, the runtime's own code).

Decode step t (0-based) of row b gets position id = last prefill position of row b + 1 + t
(runtime.positions.next_positions; M-RoPE: the row's largest id + 1 + t on all three axes).
Rows stop at their first EOS and then keep emitting EOS; the loop ends when every row has stopped
or after max_new_tokens steps. A batch of images shares one prompt, so all rows have one length.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from edgeprune.errors import EdgepruneError, ModelError
from edgeprune.models.base import Adapter
from edgeprune.models.vision_step import vision_step
from edgeprune.runtime.buckets import pick_bucket
from edgeprune.runtime.checks import check_context
from edgeprune.runtime.format import DECODER_DEEPSTACK, VISION_DEEPSTACK
from edgeprune.runtime.positions import (POSITION_MODES, build_positions, build_positions_rows, check_rope_mode,
                                         next_positions)
from edgeprune.runtime.preprocess import load_image
from edgeprune.runtime.prompt import encode_prompt
from edgeprune.runtime.sampling import check_sampling, make_rng, next_tokens

__all__ = ["generate", "GenerationResult", "encode_and_prune", "encode_prune_deepstack"]


@dataclass
class GenerationResult:
    ids: list[list[int]]             # new tokens per row, up to and including its first EOS
    text: list[str]                  # decoded `ids`, special tokens skipped
    num_image_tokens: int            # K image tokens the LLM saw per image (N without a pruner)
    image_positions: np.ndarray      # [B, K] int64 original indices of the kept tokens
    position_ids: np.ndarray         # [B, L] ([3, B, L] for M-RoPE) the prefill position ids passed to the LLM
    prompt_ids: tuple[list[int], list[int]] = field(default=((), ()))  # (prefix ids, suffix ids)
    positions_mode: str = ""         # the position rule used ("original" or "compact")


def encode_and_prune(adapter: Adapter, pruner, pixels: Tensor) -> tuple[Tensor, Tensor]:
    """pixels [B, 3, h, w] -> (image embeddings [B, K, D_llm], positions [B, K] int64): the one vision step
    (models/vision_step.py) that the exported graph runs too."""
    return encode_prune_deepstack(adapter, pruner, pixels)[:2]


def encode_prune_deepstack(adapter: Adapter, pruner, pixels: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """encode_and_prune plus the kept tokens' DeepStack features [B, K, L, D_llm] (None without DeepStack)."""
    sel = vision_step(adapter, pruner, pixels)
    return sel.tokens, sel.positions, sel.extras.get(VISION_DEEPSTACK)


def _encode_buckets(adapter: Adapter, pruner, images, buckets):
    """Each image through the adapter at its bucket's size (runtime/buckets.py's rule), rows in image
    order: (embeddings [B, K, D], positions [B, K], DeepStack [B, K, L, D] or None, the adapter of each row)."""
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    sizes = [tuple(int(v) for v in s) for s in buckets]
    chosen = [pick_bucket((im.height, im.width), sizes) for im in map(load_image, images)]
    by_size = {j: adapter.with_image_size(sizes[j]) for j in set(chosen)}
    parts = [[None] * len(images) for _ in range(3)]
    for j, sub in by_size.items():
        rows = [i for i, c in enumerate(chosen) if c == j]
        outputs = encode_prune_deepstack(sub, pruner, sub.preprocess([images[i] for i in rows]))
        for part, out in zip(parts, outputs):
            for r, i in enumerate(rows):
                part[i] = None if out is None else out[r]
    embeds, kept, deep = (None if part[0] is None else torch.stack(part) for part in parts)
    return embeds, kept, deep, [by_size[c] for c in chosen]


def _llm_dtype(adapter: Adapter) -> torch.dtype:
    return next(adapter.llm.parameters()).dtype


@torch.no_grad()
def generate(adapter: Adapter, pruner, images, prompt: str, max_new_tokens: int = 32,
             positions: str | None = None, do_sample: bool = False, top_p: float = 1.0,
             temperature: float = 1.0, seed: int = 0,
             on_token: Callable[[int, np.ndarray], None] | None = None,
             buckets: list[tuple[int, int]] | None = None, llm=None) -> GenerationResult:
    """Answer `prompt` about each image (a path, PIL image, uint8 array, or a list of them; None
    for a text-only prompt: the template without image tokens).

    `pruner`: a built pruner, `adapter.build_pruner(name, keep)` (= edgeprune.pruners.build_for_model(name,
    keep, adapter.pruner_options()) except for multi-view adapters such as LLaVA-NeXT)
    or None for no pruning. `positions`: "original" or "compact" (default: the pruner's convention, else the adapter's).
    `on_token(step, ids [B])` is called after every decode step (streaming). `llm`: an exported LLM run by the
    runtime (runtime.llm.OrtLLM, e.g. at --llm-precision int4) in place of the torch LLM: same image tokens and
    position ids, text embeddings from its own table, its prefill and decode (how `edgeprune eval --llm` measures a
    precision's accuracy). `buckets`: resolution bucket
    sizes (h, w) as exported (export_bundle(buckets=...)): each image goes through
    `adapter.with_image_size(its bucket)`, chosen by the runtime's rule (runtime/buckets.py)."""
    positions = positions or getattr(pruner, "default_positions", None) or adapter.default_positions
    if positions not in POSITION_MODES:
        raise EdgepruneError(f"positions={positions!r}, expected one of {', '.join(POSITION_MODES)}")
    rope = getattr(adapter, "rope", "1d")
    check_rope_mode(rope, positions)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise EdgepruneError(f"max_new_tokens={max_new_tokens!r}, expected an integer >= 1")
    if do_sample:
        check_sampling(top_p, temperature)
    prefix, suffix = encode_prompt(adapter.tokenizer, adapter.chat_template, prompt)
    image_ids = _image_placeholder_ids(adapter)
    if image_ids & set(suffix):
        raise ModelError("prompt contains the image placeholder token; the image is inserted by the chat "
                         "template, pass the question text only")

    # 1. vision: encode, prune, project (images=None: a text-only prompt, no image tokens)
    dtype = _llm_dtype(adapter)
    deepstack = None                                                     # [B, K, L, D] for DeepStack models
    if images is None:
        d = adapter.llm.get_input_embeddings().weight.shape[1]
        image_embeds, kept = torch.zeros(1, 0, d, dtype=dtype), torch.zeros(1, 0, dtype=torch.long)
        positions = "compact" if rope == "1d" else positions  # nothing to keep the geometry of: text is contiguous
    elif buckets:
        image_embeds, kept, deepstack, subs = _encode_buckets(adapter, pruner, images, buckets)
    else:
        pixels = adapter.preprocess(images)                               # [B, 3, h, w]
        image_embeds, kept, deepstack = encode_prune_deepstack(adapter, pruner, pixels)   # [B, K, D], [B, K]
    b, k = kept.shape
    n = adapter.num_image_tokens if images is not None else 0

    # 2. sequence [prefix, K image tokens, suffix] and its position ids (the runtime's rule)
    prefix_t = torch.tensor([prefix], dtype=torch.long).expand(b, -1)
    suffix_t = torch.tensor([suffix], dtype=torch.long).expand(b, -1)
    embeds = torch.cat([adapter.embed(prefix_t), image_embeds.to(dtype), adapter.embed(suffix_t)], dim=1)
    grid = tuple(adapter.grid) if images is not None else None
    if images is not None and buckets:   # each row's own grid and N
        pos = build_positions_rows(rope, len(prefix), kept.numpy(), [s.num_image_tokens for s in subs],
                                   [s.grid for s in subs], len(suffix), positions)
    else:
        pos = build_positions(rope, len(prefix), kept.numpy(), n, grid, len(suffix), positions)   # [B, L] / [3, B, L]
    check_context(int(pos.max()) if pos.size else -1, max_new_tokens,            # the runtime's rule
                  getattr(adapter.llm.config, "max_position_embeddings", None))

    if llm is not None:
        return _generate_with(llm, adapter, image_embeds, prefix, suffix, pos, k, kept, positions,
                              dict(max_new_tokens=max_new_tokens, eos_token_ids=adapter.eos_token_ids,
                                   do_sample=do_sample, top_p=top_p, temperature=temperature, seed=seed,
                                   on_token=on_token))

    # 3. prefill with an explicit cache
    from transformers import DynamicCache

    cache = DynamicCache(config=adapter.llm.config)
    length = embeds.shape[1]
    extra = {}
    if deepstack is not None:   # the kept tokens' features at their sequence positions, zeros elsewhere
        dense = torch.zeros(b, length, *deepstack.shape[2:], dtype=dtype)
        dense[:, len(prefix):len(prefix) + k] = deepstack.to(dtype)
        extra[DECODER_DEEPSTACK] = dense                                # [B, L, layers, D]
    out = adapter.llm(inputs_embeds=embeds, position_ids=torch.from_numpy(pos),
                      attention_mask=torch.ones(b, length, dtype=torch.long), cache=cache,
                      use_cache=True, logits_to_keep=1, **extra)
    logits = out.logits[:, -1].float().numpy()                           # [B, V]

    # 4. decode: one token per step per row, EOS stops a row
    rng = make_rng(seed) if do_sample else None
    eos = np.asarray(adapter.eos_token_ids, dtype=np.int64)
    done = np.zeros(b, dtype=bool)
    steps: list[np.ndarray] = []
    for t in range(max_new_tokens):
        ids = next_tokens(logits, do_sample, rng, top_p=top_p, temperature=temperature)
        ids = np.where(done, eos[0], ids)                                # finished rows keep emitting EOS
        steps.append(ids)
        if on_token is not None:
            on_token(t, ids.copy())
        done |= np.isin(ids, eos)
        if done.all() or t == max_new_tokens - 1:
            break
        step_pos = torch.from_numpy(next_positions(pos, t))              # [B, 1] / [3, B, 1]
        out = adapter.llm(inputs_embeds=adapter.embed(torch.from_numpy(ids).unsqueeze(1)), position_ids=step_pos,
                          attention_mask=torch.ones(b, length + t + 1, dtype=torch.long), cache=cache,
                          use_cache=True)
        logits = out.logits[:, -1].float().numpy()

    return _result(adapter, np.stack(steps, axis=1), k, kept, pos, prefix, suffix, positions)


def _result(adapter, tokens: np.ndarray, k, kept, pos, prefix, suffix, positions) -> GenerationResult:
    """tokens [B, T] -> the result, each row cut after its first EOS."""
    eos = set(int(e) for e in adapter.eos_token_ids)
    rows = []
    for row in tokens.tolist():
        stop = next((i for i, tok in enumerate(row) if tok in eos), None)
        rows.append(row if stop is None else row[:stop + 1])
    text = [adapter.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
    return GenerationResult(ids=rows, text=text, num_image_tokens=k, image_positions=kept.numpy().astype(np.int64),
                            position_ids=pos, prompt_ids=(list(prefix), list(suffix)), positions_mode=positions)


def _generate_with(llm, adapter, image_embeds, prefix, suffix, pos, k, kept, positions, options: dict):
    """Steps 3-4 of `generate` by the runtime's LLM (OrtLLM)."""
    b = image_embeds.shape[0]
    embeds = np.concatenate([llm.embed(np.array([prefix] * b, dtype=np.int64).reshape(b, -1)),
                             image_embeds.float().numpy().astype(llm.dtype),
                             llm.embed(np.array([suffix] * b, dtype=np.int64).reshape(b, -1))], axis=1)   # [B, L, D]
    gen = llm.generate(embeds, pos, **options)
    return _result(adapter, gen.ids, k, kept, pos, prefix, suffix, positions)


def _image_placeholder_ids(adapter: Adapter) -> set[int]:
    """Ids of tokens spelled like an image placeholder in the adapter's vocabulary."""
    ids = set()
    for name in ("<image>", "<|image|>", "<image_pad>", "<|image_pad|>"):
        i = adapter.tokenizer.token_to_id(name)
        if i is not None:
            ids.add(i)
    return ids
