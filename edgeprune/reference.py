"""The torch reference pipeline: the exported runtime is compared with this, token for token.

images -> adapter.preprocess -> adapter.encode(need) -> pruner -> (project if the pruner works on
`feats`) -> [prefix ids, K image tokens, suffix ids] (runtime.prompt.encode_prompt) -> embeddings
-> position ids (runtime.positions.sequence_positions, the runtime's own rule) -> prefill of the
HF causal LM (inputs_embeds, explicit position_ids, all-ones attention mask, DynamicCache) ->
greedy or top-p decode with the KV cache (runtime.sampling, the runtime's own code).

Decode step t (0-based) of row b gets position id = last prefill position of row b + 1 + t.
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
from edgeprune.runtime.positions import POSITION_MODES, sequence_positions
from edgeprune.runtime.prompt import encode_prompt
from edgeprune.runtime.sampling import check_sampling, make_rng, next_tokens

__all__ = ["generate", "GenerationResult", "encode_and_prune", "signals_needed"]


@dataclass
class GenerationResult:
    ids: list[list[int]]             # new tokens per row, up to and including its first EOS
    text: list[str]                  # decoded `ids`, special tokens skipped
    num_image_tokens: int            # K image tokens the LLM saw per image (N without a pruner)
    image_positions: np.ndarray      # [B, K] int64 original indices of the kept tokens
    position_ids: np.ndarray         # [B, L] the prefill position ids passed to the LLM
    prompt_ids: tuple[list[int], list[int]] = field(default=((), ()))  # (prefix ids, suffix ids)
    positions_mode: str = ""         # the position rule used ("original" or "compact")


def signals_needed(pruner) -> tuple[str, ...]:
    """What `encode` must compute for `pruner` (None: tokens only)."""
    if pruner is None:
        return ("tokens",)
    need = [s for s in pruner.requires if s != "grid"]
    if pruner.space == "tokens" and "tokens" not in need:
        need.append("tokens")
    return tuple(need)


def encode_and_prune(adapter: Adapter, pruner, pixels: Tensor) -> tuple[Tensor, Tensor]:
    """pixels [B, 3, h, w] -> (image embeddings [B, K, D_llm], positions [B, K] int64).
    The same composition the exporter traces: encode -> pruner -> project if space == 'feats'."""
    signals = adapter.encode(pixels, need=signals_needed(pruner))
    if pruner is None:
        b, n = signals.tokens.shape[:2]
        return signals.tokens, torch.arange(n).unsqueeze(0).expand(b, n)
    selection = pruner(**signals.as_kwargs())
    tokens = selection.tokens if pruner.space == "tokens" else adapter.project(selection.tokens)
    return tokens, selection.positions


def _llm_dtype(adapter: Adapter) -> torch.dtype:
    return next(adapter.llm.parameters()).dtype


@torch.no_grad()
def generate(adapter: Adapter, pruner, images, prompt: str, max_new_tokens: int = 32,
             positions: str | None = None, do_sample: bool = False, top_p: float = 1.0,
             temperature: float = 1.0, seed: int = 0,
             on_token: Callable[[int, np.ndarray], None] | None = None) -> GenerationResult:
    """Answer `prompt` about each image (a path, PIL image, uint8 array, or a list of them; None
    for a text-only prompt: the template without image tokens).

    `pruner`: a built pruner (edgeprune.pruners.build_for_model(name, keep, adapter.pruner_options()))
    or None for no pruning. `positions`: "original" or "compact" (default: the pruner's convention, else the adapter's).
    `on_token(step, ids [B])` is called after every decode step (streaming)."""
    positions = positions or getattr(pruner, "default_positions", None) or adapter.default_positions
    if positions not in POSITION_MODES:
        raise EdgepruneError(f"positions={positions!r}, expected one of {', '.join(POSITION_MODES)}")
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
    if images is None:
        d = adapter.llm.get_input_embeddings().weight.shape[1]
        image_embeds, kept = torch.zeros(1, 0, d, dtype=dtype), torch.zeros(1, 0, dtype=torch.long)
        positions = "compact"  # nothing to keep the geometry of: text is contiguous
    else:
        pixels = adapter.preprocess(images)                               # [B, 3, h, w]
        image_embeds, kept = encode_and_prune(adapter, pruner, pixels)   # [B, K, D], [B, K]
    b, k = kept.shape
    n = adapter.num_image_tokens if images is not None else 0

    # 2. sequence [prefix, K image tokens, suffix] and its position ids (the runtime's rule)
    prefix_t = torch.tensor([prefix], dtype=torch.long).expand(b, -1)
    suffix_t = torch.tensor([suffix], dtype=torch.long).expand(b, -1)
    embeds = torch.cat([adapter.embed(prefix_t), image_embeds.to(dtype), adapter.embed(suffix_t)], dim=1)
    pos = sequence_positions(len(prefix), kept.numpy(), n, len(suffix), positions)   # [B, L]
    max_pos = int(pos[:, -1].max()) + max_new_tokens - 1   # position of the last decode input
    limit = getattr(adapter.llm.config, "max_position_embeddings", None)
    if limit is not None and max_pos >= limit:
        raise ModelError(f"sequence needs position ids up to {max_pos}, the LLM allows < {limit}; "
                         "shorten the prompt or max_new_tokens")

    # 3. prefill with an explicit cache
    from transformers import DynamicCache

    cache = DynamicCache(config=adapter.llm.config)
    length = embeds.shape[1]
    out = adapter.llm(inputs_embeds=embeds, position_ids=torch.from_numpy(pos),
                      attention_mask=torch.ones(b, length, dtype=torch.long), past_key_values=cache,
                      use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1].float().numpy()                           # [B, V]

    # 4. decode: one token per step per row, EOS stops a row
    rng = make_rng(seed) if do_sample else None
    eos = np.asarray(adapter.eos_token_ids, dtype=np.int64)
    done = np.zeros(b, dtype=bool)
    steps: list[np.ndarray] = []
    last = pos[:, -1].astype(np.int64)                                   # [B]
    for t in range(max_new_tokens):
        ids = next_tokens(logits, do_sample, rng, top_p=top_p, temperature=temperature)
        ids = np.where(done, eos[0], ids)                                # finished rows keep emitting EOS
        steps.append(ids)
        if on_token is not None:
            on_token(t, ids.copy())
        done |= np.isin(ids, eos)
        if done.all() or t == max_new_tokens - 1:
            break
        step_pos = torch.from_numpy(last + 1 + t).unsqueeze(1)          # [B, 1]
        out = adapter.llm(inputs_embeds=adapter.embed(torch.from_numpy(ids).unsqueeze(1)), position_ids=step_pos,
                          attention_mask=torch.ones(b, length + t + 1, dtype=torch.long), past_key_values=cache,
                          use_cache=True)
        logits = out.logits[:, -1].float().numpy()

    tokens = np.stack(steps, axis=1)                                     # [B, T]
    rows = []
    for row in tokens.tolist():
        stop = next((i for i, tok in enumerate(row) if tok in set(eos.tolist())), None)
        rows.append(row if stop is None else row[:stop + 1])
    text = [adapter.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
    return GenerationResult(ids=rows, text=text, num_image_tokens=k, image_positions=kept.numpy().astype(np.int64),
                            position_ids=pos, prompt_ids=(list(prefix), list(suffix)), positions_mode=positions)


def _image_placeholder_ids(adapter: Adapter) -> set[int]:
    """Ids of tokens spelled like an image placeholder in the adapter's vocabulary."""
    ids = set()
    for name in ("<image>", "<|image|>", "<image_pad>"):
        i = adapter.tokenizer.token_to_id(name)
        if i is not None:
            ids.add(i)
    return ids
