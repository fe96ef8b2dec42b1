"""The on-device pipeline: bundle -> preprocess -> vision (encoder + pruner) -> LLM -> text.

numpy, onnxruntime, tokenizers and Pillow only (no torch, no transformers). The steps mirror the torch
reference (edgeprune/reference.py) using the same shared code: runtime.preprocess, runtime.prompt,
runtime.positions and runtime.sampling (through OrtLLM), so greedy tokens match it exactly.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from edgeprune.errors import BundleError, ModelError
from edgeprune.runtime.bundle import Bundle, check_vision_graph, load_bundle
from edgeprune.runtime.checks import check_context, check_count, check_images, check_prompt, check_seed
from edgeprune.runtime.format import VISION_DEEPSTACK, VISION_POSITIONS, VISION_TOKENS, Bucket, Files
from edgeprune.runtime.buckets import pick_bucket
from edgeprune.runtime.positions import build_positions, largest_position
from edgeprune.runtime.sampling import check_sampling
from edgeprune.runtime.preprocess import load_image, preprocess
from edgeprune.runtime.prompt import encode_prompt
from edgeprune.runtime.providers import requested_providers, resolve_providers
from edgeprune.runtime.stages import StagePlan
from edgeprune.runtime.vision import open_vision

__all__ = ["Pipeline", "Result"]

log = logging.getLogger(__name__)

STAGES = ("preprocess", "vision", "embed", "prefill", "decode")


@dataclass
class Result:
    """One `Pipeline.__call__`: a row per image."""

    texts: list[str]                      # decoded new tokens per row (special tokens skipped)
    ids: list[list[int]]                  # new token ids per row, up to and including its first EOS
    positions: np.ndarray                 # [B, K] int64 kept image-token positions
    extras: dict[str, np.ndarray]         # the pruner's extra graph outputs (e.g. "gate")
    timings: dict[str, float]             # seconds per stage (STAGES); decode = all decode steps
    num_prompt_tokens: int                # prefill length (prefix + K + suffix; the longest row's)
    kv_bytes: int                         # KV cache at the end of generation
    decode_steps: list[float] = field(default_factory=list)  # seconds per decode step
    buckets: list[int] = field(default_factory=list)        # resolution bucket of each row (0 without buckets)
    prompt_lengths: list[int] = field(default_factory=list) # each row's prefill length (rows may differ)
    stage_keep: list[np.ndarray] = field(default_factory=list)  # per in-LLM stage: [B, K_s] kept slots (0..K-1)

    @property
    def kept_positions(self) -> np.ndarray:
        """[B, K_final] grid positions of the image tokens the last LLM layer saw (= positions without a stage)."""
        if not self.stage_keep:
            return self.positions
        return np.take_along_axis(self.positions, self.stage_keep[-1], axis=1)

    @property
    def text(self) -> str:
        return self.texts[0]

    @property
    def tokens_per_s(self) -> float:
        steps = len(self.decode_steps)
        return steps / self.timings["decode"] if steps and self.timings["decode"] > 0 else float("nan")


class Pipeline:
    """`Pipeline(bundle_dir)(images, prompt)` -> Result. Verifies the bundle on load (BundleError if
    the manifest, a file or a hash is wrong, or K in the manifest differs from the vision graph's)."""

    def __init__(self, bundle_dir: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 verify: bool = True, llm=None, share_weights: bool = False):
        """`providers`: short names (cpu, cuda, tensorrt) in priority order, resolved once for every graph
        (runtime/providers.py). With tensorrt and an engine from `edgeprune build-engine`, the vision graph
        runs as that engine (runtime/vision.py); the LLM runs on ONNX Runtime. `llm`: an OrtLLM to use
        instead of loading this bundle's, shared by bundles whose LLM graphs are the same files (the
        profiler, interleaving a sweep, keeps one LLM in memory instead of one per K; it checks the files).
        `share_weights`: bundles with an in-LLM stage load the LLM weights once for their prefill and decoder
        graphs (runtime/llm.py)."""
        from tokenizers import Tokenizer

        from edgeprune.runtime.llm import OrtLLM

        self.bundle: Bundle = load_bundle(bundle_dir, verify=verify)
        root = self.bundle.path
        if self.bundle.unlisted:
            log.warning("%s holds %d file(s) its manifest does not list (never loaded): %s", root,
                        len(self.bundle.unlisted), ", ".join(self.bundle.unlisted[:5]))
        self.providers = resolve_providers(providers, cache_dir=root / Files.ORT_TRT_CACHE)
        use_engine = "tensorrt" in requested_providers(providers)
        # one vision graph per resolution bucket (a single one without buckets); vision = the default's
        self.buckets = self.bundle.buckets
        self.runners = [open_vision(self.bundle, bucket[Bucket.FILE], self.providers, threads, use_engine=use_engine)
                        for bucket in self.buckets]
        for bucket, runner in zip(self.buckets, self.runners):
            check_vision_graph(self.bundle, bucket, runner.input_shape, runner.output_shapes)
        self.vision = self.runners[0]
        try:
            self.tokenizer = Tokenizer.from_file(str(root / Files.TOKENIZER))
        except Exception as err:  # tokenizers raises a bare Exception on a malformed file
            raise BundleError(f"{root / Files.TOKENIZER}: cannot load ({err})") from err
        self.stages = StagePlan.from_manifest(self.bundle.manifest)   # None: no in-LLM stage
        self.llm = llm or OrtLLM(root, self.bundle.manifest, providers=self.providers, threads=threads,
                                 stages=self.stages, share_weights=share_weights)

    @property
    def keep(self) -> int:
        return self.bundle.keep

    def __call__(self, images, prompt: str, *, max_new_tokens: int = 32, do_sample: bool = False,
                 top_p: float = 1.0, temperature: float = 1.0, seed: int = 0,
                 on_text: Callable[[int, str], None] | None = None) -> Result:
        """Answer `prompt` about each image (path, PIL image or uint8 array; or a list: one row each).

        `on_text(row, piece)` streams decoded text as tokens arrive (pieces concatenate to the row's
        text). Greedy by default; `do_sample` draws top-p samples seeded by `seed`."""
        images = check_images(images)
        return self.generate_rows(images, [prompt] * len(images), max_new_tokens=max_new_tokens, do_sample=do_sample,
                                  top_p=top_p, temperature=temperature, seed=seed, on_text=on_text)

    def generate_rows(self, images: list, prompts: list[str], *, max_new_tokens: int = 32, do_sample: bool = False,
                      top_p: float = 1.0, temperature: float = 1.0, seed: int = 0,
                      on_text: Callable[[int, str], None] | None = None) -> Result:
        """Answer prompts[i] about images[i], all rows in one batch (the server's batched entry point).

        Prompts may differ in length: the LLM gets the rows right-padded (runtime/llm.py), so a row's greedy
        tokens are those of the row run alone (up to the float rounding of batched kernels). Same options as
        `__call__`; one random stream for the batch when sampling."""
        timings = {}
        images = check_images(images)
        if not isinstance(prompts, (list, tuple)):
            raise ModelError(f"prompts: expected a list of str, one per image, got {type(prompts).__name__}")
        prompts = [check_prompt(prompt) for prompt in prompts]
        if len(prompts) != len(images):
            raise ModelError(f"{len(images)} image(s) and {len(prompts)} prompt(s): expected one prompt per image")
        max_new_tokens, seed = check_count("max_new_tokens", max_new_tokens), check_seed(seed)
        if do_sample:
            check_sampling(top_p, temperature)
        # 1. preprocess (the adapter's own numpy code), each image at its bucket's size
        start = time.perf_counter()
        chosen = self.choose_buckets(images)                                              # [B] bucket per image
        encoded = [encode_prompt(self.tokenizer, self.bundle.chat_template, prompt) for prompt in prompts]
        self._check_context(encoded, chosen, max_new_tokens)                              # before any graph runs
        if self.stages is not None:   # the in-LLM stage was exported for one image start and needs text
            self.stages.check_rows(len(encoded[0][0]), [len(suffix) for _, suffix in encoded])
        groups = {j: [i for i, c in enumerate(chosen) if c == j] for j in sorted(set(chosen))}
        pixels = {j: preprocess([images[i] for i in rows], replace(self.bundle.preprocess,
                                                                   size=tuple(self.buckets[j][Bucket.SIZE])))
                  .astype(self.runners[j].pixel_dtype) for j, rows in groups.items()}     # [B_j, 3, H_j, W_j]
        timings["preprocess"] = time.perf_counter() - start
        b = len(images)
        if self.vision.batch is not None and self.vision.batch != b:
            raise ModelError(f"{b} image(s) given; this bundle's vision graph takes exactly {self.vision.batch} "
                             f"(exported with --batch {self.vision.batch})")

        # 2. vision: encoder + pruner (+ projector) in one graph per bucket; rows back in image order
        start = time.perf_counter()
        outputs = {}
        for j, rows in groups.items():
            for name, value in self.runners[j].run(pixels[j]).items():
                if name not in outputs:
                    outputs[name] = np.zeros((b, *value.shape[1:]), dtype=value.dtype)
                outputs[name][rows] = value
        timings["vision"] = time.perf_counter() - start
        image_tokens, positions = outputs.pop(VISION_TOKENS), outputs.pop(VISION_POSITIONS)  # [B, K, D], [B, K]
        self._check_positions(positions, chosen)
        image_deepstack = outputs.pop(VISION_DEEPSTACK, None)                           # [B, K, layers, D]

        # 3. per row [prefix, K image tokens, suffix] and its position ids (the bundle's mode), right-padded
        start = time.perf_counter()
        embeds, position_ids, lengths = self._llm_inputs(image_tokens, positions, encoded, chosen)
        deepstack = self._deepstack_inputs(image_deepstack, len(encoded[0][0]), embeds.shape[1])
        timings["embed"] = time.perf_counter() - start

        # 4. prefill + decode with the KV cache; stream text per row
        streamer = _Streamer(self.tokenizer, b, self.bundle.eos_token_ids, on_text) if on_text else None
        gen = self.llm.generate(embeds, position_ids, max_new_tokens=max_new_tokens,
                                eos_token_ids=self.bundle.eos_token_ids, do_sample=do_sample, top_p=top_p,
                                temperature=temperature, seed=seed, lengths=lengths,
                                on_token=streamer.push if streamer else None, deepstack=deepstack,
                                image_positions=positions if self.stages is not None else None)
        timings["prefill"] = gen.prefill_s
        timings["decode"] = float(sum(gen.decode_s))
        ids = _cut_at_eos(gen.ids, self.bundle.eos_token_ids)
        texts = [self.tokenizer.decode(row, skip_special_tokens=True) for row in ids]
        if streamer:
            streamer.flush(texts)
        return Result(texts=texts, ids=ids, positions=positions.astype(np.int64), extras=outputs, timings=timings,
                      num_prompt_tokens=gen.num_prompt_tokens, kv_bytes=gen.kv_bytes, decode_steps=list(gen.decode_s),
                      buckets=chosen, prompt_lengths=lengths.tolist(), stage_keep=gen.stage_keep)

    def _llm_inputs(self, image_tokens: np.ndarray, positions: np.ndarray, encoded: list[tuple[list[int], list[int]]],
                    chosen: list[int]):
        """-> (inputs_embeds [B, L, D], position_ids [B, L] or [3, B, L], lengths [B]): row i is
        [prefix, its K image tokens, its prompt's suffix] (`encoded`: encode_prompt's ids per row), right-padded
        with zeros to the longest row L."""
        b, k = positions.shape
        prefix = encoded[0][0]                      # the template's text before the image: the same for every row
        suffixes = [suffix for _, suffix in encoded]
        lengths = np.array([len(prefix) + k + len(s) for s in suffixes], dtype=np.int64)
        width = int(lengths.max())
        dtype = self.llm.dtype
        embeds = np.zeros((b, width, self.llm.hidden_size), dtype=dtype)
        embeds[:, :len(prefix)] = self._embed_rows([prefix])
        embeds[:, len(prefix):len(prefix) + k] = image_tokens.astype(dtype)
        suffix_embeds = self._embed_rows(suffixes)                                     # [B, S_max, D]
        rows = []
        for i, suffix in enumerate(suffixes):
            embeds[i, len(prefix) + k:lengths[i]] = suffix_embeds[i, :len(suffix)]
            bucket = self.buckets[chosen[i]]
            ids = build_positions(self.bundle.rope, len(prefix), positions[i:i + 1], bucket[Bucket.NUM_IMAGE_TOKENS],
                                  bucket[Bucket.GRID], len(suffix), self.bundle.positions_mode)  # [1, L_i] / [3, 1, L_i]
            pad = [(0, 0)] * (ids.ndim - 1) + [(0, width - ids.shape[-1])]
            rows.append(np.pad(ids, pad))
        return np.ascontiguousarray(embeds), np.concatenate(rows, axis=-2), lengths

    def _deepstack_inputs(self, image_deepstack: np.ndarray | None, start: int, width: int) -> np.ndarray | None:
        """A DeepStack decoder's input [B, L, layers, D]: the K image tokens' features `image_deepstack`
        [B, K, layers, D] at their sequence positions start..start+K-1, zeros at text and padding (None: no
        DeepStack)."""
        if image_deepstack is None:
            return None
        b, k = image_deepstack.shape[:2]
        dense = np.zeros((b, width, *image_deepstack.shape[2:]), dtype=self.llm.dtype)
        dense[:, start:start + k] = image_deepstack
        return dense

    def _embed_rows(self, texts: list[list[int]]) -> np.ndarray:
        """Token ids of text parts -> [len(texts), longest, D] embeddings (zeros past each part's end)."""
        width = max(map(len, texts))
        if width == 0:
            return np.zeros((len(texts), 0, self.llm.hidden_size), dtype=self.llm.dtype)
        ids = np.zeros((len(texts), width), dtype=np.int64)
        for i, part in enumerate(texts):
            ids[i, :len(part)] = part
        return self.llm.embed(ids)

    def choose_buckets(self, images: list) -> list[int]:
        """The resolution bucket of each image (runtime/buckets.py); all 0 without buckets."""
        if len(self.buckets) == 1:
            return [0] * len(images)
        sizes = [tuple(bucket[Bucket.SIZE]) for bucket in self.buckets]
        return [pick_bucket((im.height, im.width), sizes) for im in map(load_image, images)]

    def _check_context(self, encoded: list[tuple[list, list]], chosen: list[int], max_new_tokens: int) -> None:
        """The context-length rule (runtime/checks.py) for each row's prompt and the bucket its image chose."""
        top = max(largest_position(self.bundle.rope, len(prefix), self.keep, self.buckets[c][Bucket.NUM_IMAGE_TOKENS],
                                   self.buckets[c][Bucket.GRID], len(suffix), self.bundle.positions_mode)
                  for (prefix, suffix), c in zip(encoded, chosen))
        check_context(top, max_new_tokens, self.llm.context_length)

    def _check_positions(self, positions: np.ndarray, chosen: list[int]) -> None:
        """The vision graph's positions must index its N tokens (a manifest whose N was edited says otherwise)."""
        nums = np.array([self.buckets[c][Bucket.NUM_IMAGE_TOKENS] for c in chosen])[:, None]
        if positions.size and (positions.min() < 0 or (positions >= nums).any()):
            raise BundleError(f"{self.bundle.path}: the vision graph returned positions up to {positions.max()}, "
                              f"outside 0..N-1 for the manifest's N = {nums.ravel().tolist()}")


def _cut_at_eos(ids: np.ndarray, eos: list[int]) -> list[list[int]]:
    """[B, T] -> per row, the ids up to and including the first EOS (finished rows repeat EOS after it)."""
    stops = set(eos)
    rows = []
    for row in np.asarray(ids).tolist():
        end = next((i for i, tok in enumerate(row) if tok in stops), None)
        rows.append(row if end is None else row[:end + 1])
    return rows


class _Streamer:
    """Turns per-step ids into text pieces per row. Decodes the row so far and emits the new suffix,
    holding back an incomplete UTF-8 character (byte-level tokens decode to U+FFFD until complete)."""

    def __init__(self, tokenizer, batch: int, eos: list[int], on_text: Callable[[int, str], None]):
        self.tokenizer, self.on_text, self.eos = tokenizer, on_text, set(eos)
        self.ids: list[list[int]] = [[] for _ in range(batch)]
        self.sent = [""] * batch
        self.done = [False] * batch

    def push(self, step: int, ids: np.ndarray) -> None:
        for row, tok in enumerate(np.asarray(ids).tolist()):
            if self.done[row]:
                continue
            self.ids[row].append(tok)
            self.done[row] = tok in self.eos
            text = self.tokenizer.decode(self.ids[row], skip_special_tokens=True)
            if text.endswith("\ufffd") and not self.done[row]:
                continue
            self._emit(row, text)

    def flush(self, texts: list[str]) -> None:
        for row, text in enumerate(texts):
            self._emit(row, text)

    def _emit(self, row: int, text: str) -> None:
        if text.startswith(self.sent[row]) and len(text) > len(self.sent[row]):
            self.on_text(row, text[len(self.sent[row]):])
            self.sent[row] = text
        elif not text.startswith(self.sent[row]):
            log.debug("stream row %d: decoded text changed retroactively; piece dropped", row)
