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
or after max_new_tokens steps. One prompt for the batch, or one per row: shorter rows are
right-padded (runtime.prompt.encode_prompts) and masked.

With an in-LLM stage (edgeprune/inllm, METHODS_INLLM.md) or prompts of different lengths, prefill and
decode run the model's decoder layers one at a time (inllm/loop.py), the stage between layer L-1 and L.
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
from edgeprune.runtime.positions import (POSITION_MODES, build_positions_rows, check_rope_mode,
                                         next_positions)
from edgeprune.runtime.preprocess import load_image
from edgeprune.runtime.prompt import encode_prompts
from edgeprune.runtime.sampling import check_sampling, make_rng, next_tokens

__all__ = ["generate", "GenerationResult", "encode_and_prune", "encode_prune_deepstack", "prefill_inputs",
           "PrefillInputs"]


@dataclass
class GenerationResult:
    ids: list[list[int]]             # new tokens per row, up to and including its first EOS
    text: list[str]                  # decoded `ids`, special tokens skipped
    num_image_tokens: int            # K image tokens the LLM saw per image (N without a pruner)
    image_positions: np.ndarray      # [B, K] int64 original indices of the kept tokens
    position_ids: np.ndarray         # [B, L] ([3, B, L] for M-RoPE) the prefill position ids passed to the LLM
    prompt_ids: tuple[list[int], list[int]] = field(default=((), ()))  # (prefix ids, suffix ids of row 0)
    positions_mode: str = ""         # the position rule used ("original" or "compact")
    stage_keep: list[np.ndarray] = field(default_factory=list)  # per in-LLM stage: [B, K_s] slots kept (0..K-1)


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


@dataclass
class PrefillInputs:
    """What the LLM's prefill gets (steps 1-2 of `generate`)."""

    embeds: Tensor                   # [B, L, D] prefix, image tokens, suffix (right-padded per row)
    position_ids: np.ndarray         # [B, L] or [3, B, L]
    attention_mask: Tensor           # [B, L] int64, 1 = real token
    image_positions: Tensor          # [B, K] kept image tokens' original indices
    prefix: list[int]                # prefix ids (the image starts after len(prefix) tokens)
    suffix: list[int]                # suffix ids of row 0 (without padding)
    positions_mode: str
    deepstack: Tensor | None = None  # [B, L, layers, D] DeepStack features at the image slots, zeros elsewhere
    image_embeds: Tensor | None = None   # [B, K, D] the projected image tokens as the vision step returned them
    suffix_ids: np.ndarray | None = None  # [B, M] suffix ids per row, right-padded (attention_mask says where)


@torch.no_grad()
def prefill_inputs(adapter: Adapter, pruner, images, prompt, positions: str | None = None,
                   buckets: list[tuple[int, int]] | None = None) -> PrefillInputs:
    """Encode, prune and project the images and lay out [prefix, K image tokens, suffix] with its mask and
    position ids (the runtime's rule). Arguments as `generate`."""
    positions = positions or getattr(pruner, "default_positions", None) or adapter.default_positions
    if positions not in POSITION_MODES:
        raise EdgepruneError(f"positions={positions!r}, expected one of {', '.join(POSITION_MODES)}")
    rope = getattr(adapter, "rope", "1d")
    check_rope_mode(rope, positions)
    n_rows = len(images) if isinstance(images, (list, tuple)) else 1
    if n_rows == 0:
        raise ModelError("no image given")
    prompts = [prompt] * n_rows if isinstance(prompt, str) or images is None else list(prompt)
    if len(prompts) != n_rows:
        raise EdgepruneError(f"{len(prompts)} prompts for {n_rows} image(s); expected one prompt or one per image")
    prefix, suffix_ids, suffix_mask = encode_prompts(adapter.tokenizer, adapter.chat_template, prompts)
    if _image_placeholder_ids(adapter) & set(suffix_ids[suffix_mask == 1].tolist()):
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

    # 2. sequence [prefix, K image tokens, suffix (right-padded)], its mask and position ids (the runtime's rule)
    prefix_t = torch.tensor([prefix], dtype=torch.long).expand(b, -1)
    embeds = torch.cat([adapter.embed(prefix_t), image_embeds.to(dtype),
                        adapter.embed(torch.from_numpy(suffix_ids))], dim=1)
    mask = torch.cat([torch.ones(b, len(prefix) + k, dtype=torch.long), torch.from_numpy(suffix_mask)], dim=1)
    rows = subs if images is not None and buckets else [adapter] * b     # each row's own grid and N
    nums, grids = ([s.num_image_tokens for s in rows], [s.grid for s in rows]) if images is not None else ([0], [None])
    pos = build_positions_rows(rope, len(prefix), kept.numpy(), nums, grids, suffix_mask.sum(axis=1).tolist(),
                               positions)                                # [B, L] / [3, B, L]
    dense = None
    if deepstack is not None:   # the kept tokens' features at their sequence positions, zeros elsewhere
        dense = torch.zeros(b, embeds.shape[1], *deepstack.shape[2:], dtype=dtype)
        dense[:, len(prefix):len(prefix) + k] = deepstack.to(dtype)                  # [B, L, layers, D]
    return PrefillInputs(embeds=embeds, position_ids=pos, attention_mask=mask, image_positions=kept,
                         prefix=list(prefix), suffix=suffix_ids[0][suffix_mask[0] == 1].tolist(),
                         positions_mode=positions, deepstack=dense, image_embeds=image_embeds,
                         suffix_ids=suffix_ids)


@torch.no_grad()
def generate(adapter: Adapter, pruner, images, prompt: str | list[str], max_new_tokens: int = 32,
             positions: str | None = None, do_sample: bool = False, top_p: float = 1.0,
             temperature: float = 1.0, seed: int = 0,
             on_token: Callable[[int, np.ndarray], None] | None = None,
             buckets: list[tuple[int, int]] | None = None, llm_stage=None,
             kv_policy: str = "uniform", llm=None) -> GenerationResult:
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
    `adapter.with_image_size(its bucket)`, chosen by the runtime's rule (runtime/buckets.py).
    `prompt`: one for every row, or a list with one per image. `llm_stage`: a built in-LLM method
    (edgeprune.inllm.build) run inside the prefill with `kv_policy` "uniform" or "faithful"."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise EdgepruneError(f"max_new_tokens={max_new_tokens!r}, expected an integer >= 1")
    if do_sample:
        check_sampling(top_p, temperature)
    if llm_stage is not None and images is None:
        raise EdgepruneError(f"in-LLM method {llm_stage.name!r} needs an image to prune; got a text-only prompt")
    inputs = prefill_inputs(adapter, pruner, images, prompt, positions, buckets)
    embeds, pos, mask, kept = inputs.embeds, inputs.position_ids, inputs.attention_mask, inputs.image_positions
    b, k = kept.shape
    check_context(int(pos.max()) if pos.size else -1, max_new_tokens,            # the runtime's rule
                  getattr(adapter.llm.config, "max_position_embeddings", None))

    if llm is not None:
        if llm_stage is not None:
            raise EdgepruneError(f"in-LLM method {llm_stage.name!r} with an exported LLM (llm=...): the stage runs in "
                                 "the torch reference only; export it into a bundle to run it by the runtime")
        return _generate_with(llm, adapter, inputs, dict(
            max_new_tokens=max_new_tokens, eos_token_ids=adapter.eos_token_ids, do_sample=do_sample, top_p=top_p,
            temperature=temperature, seed=seed, on_token=on_token))

    # 3. prefill: the HF forward, or layer by layer with in-LLM stages / padded rows (inllm/loop.py)
    from transformers import DynamicCache

    staged = None
    if llm_stage is not None or not bool(mask.all()):
        from edgeprune.inllm.boundary import StageRunner
        from edgeprune.inllm.loop import StagedLM

        if inputs.deepstack is not None:   # the layer loop has no DeepStack hook (export_llm refuses it too)
            raise EdgepruneError("a DeepStack LLM (Qwen3-VL) in the torch reference: one prompt for every row and no "
                                 "in-LLM stage (the layer-by-layer loop does not add DeepStack features)")
        runner = None if llm_stage is None else StageRunner(
            llm_stage, num_image=k, num_layers=adapter.llm.config.num_hidden_layers, image_start=len(inputs.prefix),
            kv_policy=kv_policy, grid=tuple(adapter.grid))
        staged = StagedLM(adapter.llm, runner)
        logits = staged.prefill(embeds, torch.from_numpy(pos), mask, kept).numpy()
    else:
        cache = DynamicCache(config=adapter.llm.config)
        length = embeds.shape[1]
        extra = {} if inputs.deepstack is None else {DECODER_DEEPSTACK: inputs.deepstack}
        out = adapter.llm(inputs_embeds=embeds, position_ids=torch.from_numpy(pos), attention_mask=mask,
                          cache=cache, use_cache=True, logits_to_keep=1, **extra)
        logits = out.logits[:, -1].float().numpy()                       # [B, V]

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
        step_embeds = adapter.embed(torch.from_numpy(ids).unsqueeze(1))
        if staged is not None:
            logits = staged.step(step_embeds, step_pos).numpy()
            continue
        out = adapter.llm(inputs_embeds=step_embeds, position_ids=step_pos,
                          attention_mask=torch.ones(b, length + t + 1, dtype=torch.long), cache=cache,
                          use_cache=True)
        logits = out.logits[:, -1].float().numpy()

    return _result(adapter, np.stack(steps, axis=1), inputs, staged)


def _result(adapter, tokens: np.ndarray, inputs: PrefillInputs, staged=None) -> GenerationResult:
    """tokens [B, T] -> the result, each row cut after its first EOS."""
    eos = set(int(e) for e in adapter.eos_token_ids)
    rows = []
    for row in tokens.tolist():
        stop = next((i for i, tok in enumerate(row) if tok in eos), None)
        rows.append(row if stop is None else row[:stop + 1])
    text = [adapter.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
    kept = inputs.image_positions
    return GenerationResult(ids=rows, text=text, num_image_tokens=kept.shape[1],
                            image_positions=kept.numpy().astype(np.int64), position_ids=inputs.position_ids,
                            prompt_ids=(inputs.prefix, inputs.suffix), positions_mode=inputs.positions_mode,
                            stage_keep=[s.numpy() for s in staged.keeps] if staged is not None else [])


def _generate_with(llm, adapter, inputs: PrefillInputs, options: dict) -> GenerationResult:
    """Steps 3-4 of `generate` by the runtime's LLM (OrtLLM): text embeddings from its own table."""
    b = inputs.image_positions.shape[0]
    embeds = np.concatenate([llm.embed(np.array([inputs.prefix] * b, dtype=np.int64).reshape(b, -1)),
                             inputs.image_embeds.float().numpy().astype(llm.dtype),
                             llm.embed(np.asarray(inputs.suffix_ids, dtype=np.int64).reshape(b, -1))], axis=1)
    lengths = inputs.attention_mask.sum(dim=1).numpy()
    gen = llm.generate(embeds, inputs.position_ids, lengths=None if bool((lengths == embeds.shape[1]).all()) else lengths,
                       **options)
    return _result(adapter, gen.ids, inputs)


def _image_placeholder_ids(adapter: Adapter) -> set[int]:
    """Ids of tokens spelled like an image placeholder in the adapter's vocabulary."""
    ids = set()
    for name in ("<image>", "<|image|>", "<image_pad>", "<|image_pad|>"):
        i = adapter.tokenizer.token_to_id(name)
        if i is not None:
            ids.add(i)
    return ids
