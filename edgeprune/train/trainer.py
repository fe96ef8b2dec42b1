"""AutoSelect training loop (METHODS.md, AutoSelect, Training): the VLM is frozen, only the Scorer and
the Denoiser learn, the loss is the next-token NLL of the answer tokens.

One step:  feats [B,N,C] -> Scorer -> z-score -> soft top-K alpha (tau) -> VP noise gate -> Denoiser
           -> frozen projector -> frozen LLM on [prefix, N image tokens, prompt suffix, answer]
           -> NLL of the answer tokens only.
By default every N tokens are fed at training (the gate does the "pruning"), with the
"original" 1-D position ids of an autoselect export (with K = N every position mode is plain arange).

Options that depart from METHODS.md, for a run that fits a small CPU (issue 12; off by default):
- `keeps`: one Scorer for several budgets: step s trains K = keeps[s % len(keeps)] (cyclic, so every
  budget sees every phase of the tau and lr schedules); `keep` is then only the nominal budget.
- `llm_tokens` = f > 0: only the M = min(N, ceil(f * K)) highest-scoring tokens (ascending original
  positions, their own position ids) go through the noise gate, Denoiser, projector and LLM; the other
  N - M count as dropped (alpha = 0), which is what inference does with them. alpha is still the soft
  top-K over all N (the z-score and lambda see every score), so the Scorer learns from the ranks near
  the cut, where its choice matters; the LLM cost falls from N to M image tokens.
- `denoise` = "dropped": the Denoiser's change is weighted by 1 - alpha (x_tilde + (1 - alpha)
  (Denoiser(x_tilde) - x_tilde)), so kept tokens reach the frozen projector as they are. With "all"
  (METHODS.md) the Denoiser is a free per-token adapter in front of the projector: measured on
  edgeprune-mini (issue 12, 240 steps), it changed clean feats by 358 % (relative L2) and the Scorer
  trained behind it scored 0.025 at K = 16 and 0.000 at K = 32 on held-out images, where the Denoiser
  is gone; the untrained scorer 0.000 / 0.000 (80 validation images of the train split).
- `regularizer` (a Trainer argument, not in TrainConfig): a loss on the Scorer's raw scores added to the
  NLL each step, e.g. scripts/train_mini_scorer.py's --distill-weight (a listwise loss towards DivPrune's
  greedy order, so the Scorer keeps the coverage it was distilled to while the NLL fine-tunes it).
- `autocast`: the frozen VLM's forward and backward in bfloat16 autocast (the Scorer's scores, alpha and
  the gate stay float32), as scripts/align_mini_projector.py trains the projector.

Not in the spec, chosen here: AdamW (weight decay 0.01 on matrices only), linear warmup then cosine
decay of the learning rate to 10 % of its peak, gradient clipping at norm 1.0, right padding (the
LLM is causal, so padding after a row's last token cannot reach it; no attention mask is needed).
A checkpoint is the Scorer file (`save_scorer`, what `build("autoselect", scorer=PATH)` loads) plus
`<PATH>.trainer.pt` beside it (Denoiser, optimizer, step, RNG states, config, losses) for resume.
Batches are a pure function of (seed, step), so a resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import copy
import inspect
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeprune.errors import EdgepruneError
from edgeprune.pruners.autoselect import AutoSelect
from edgeprune.runtime.positions import sequence_positions
from edgeprune.train.denoiser import Denoiser
from edgeprune.train.noise_gate import vp_gate
from edgeprune.train.soft_topk import soft_topk, zscore

__all__ = ["TrainConfig", "Batch", "Trainer", "tau_at", "lr_at", "adamw", "gated_features", "answer_nll",
           "state_path", "freeze"]

log = logging.getLogger(__name__)

DENOISE = ("all", "dropped")              # TrainConfig.denoise
POSITIONS = AutoSelect.default_positions   # "original": the position ids an autoselect export uses


@dataclass
class TrainConfig:
    keep: int
    steps: int
    lr: float = 1e-4
    batch_size: int = 2
    seed: int = 0
    warmup: int | None = None        # steps of linear warmup; None: 5 % of steps (at least 1)
    min_lr_ratio: float = 0.1        # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    tau_start: float = 1.0
    tau_end: float = 0.05
    save_every: int = 0              # also checkpoint every this many steps (0: only at the end)
    keeps: tuple[int, ...] = ()      # budgets trained in turn, step s: keeps[s % len] (empty: keep)
    llm_tokens: float = 0.0          # > 0: only the ceil(llm_tokens * K) top-scored tokens reach the LLM
    autocast: bool = False           # bf16 autocast for the frozen VLM
    denoise: str = "all"             # "all": Denoiser on every token (METHODS.md); "dropped": weighted by 1 - alpha

    def __post_init__(self):
        self.keeps = tuple(self.keeps)
        checks = [("keep", self.keep >= 1, ">= 1"), ("steps", self.steps >= 1, ">= 1"), ("lr", self.lr > 0, "> 0"),
                  ("batch_size", self.batch_size >= 1, ">= 1"), ("grad_clip", self.grad_clip > 0, "> 0"),
                  ("tau_start", self.tau_start > 0, "> 0"),
                  ("tau_end", 0 < self.tau_end <= self.tau_start, "in (0, tau_start]"),
                  ("warmup", self.warmup is None or self.warmup >= 0, ">= 0"),
                  ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
                  ("save_every", self.save_every >= 0, ">= 0"),
                  ("keeps", all(isinstance(k, int) and k >= 1 for k in self.keeps), "integers >= 1"),
                  ("llm_tokens", self.llm_tokens == 0 or self.llm_tokens >= 1, "0 (all N) or >= 1"),
                  ("denoise", self.denoise in DENOISE, " or ".join(map(repr, DENOISE)))]
        for name, ok, expected in checks:
            if not ok:
                raise EdgepruneError(f"train: {name}={getattr(self, name)!r}, expected {expected}")

    def keep_at(self, step: int) -> int:
        """The budget K trained at `step`."""
        return self.keeps[step % len(self.keeps)] if self.keeps else self.keep

    def llm_count(self, keep: int, n: int) -> int:
        """How many image tokens reach the LLM when training budget `keep` of `n`."""
        return n if not self.llm_tokens else min(n, math.ceil(self.llm_tokens * keep))

    @property
    def warmup_steps(self) -> int:
        return max(1, round(0.05 * self.steps)) if self.warmup is None else self.warmup


def tau_at(step: int, total: int, start: float = 1.0, end: float = 0.05) -> float:
    """Cosine temperature schedule (step 5): `start` at step 0, `end` at step `total`."""
    t = min(max(step / max(total, 1), 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to config.lr over warmup_steps, then cosine to lr * min_lr_ratio at config.steps."""
    warm = config.warmup_steps
    if step < warm:
        return config.lr * (step + 1) / warm
    t = min((step - warm) / max(config.steps - warm, 1), 1.0)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1.0 + math.cos(math.pi * t))


def adamw(modules, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the modules' parameters at lr_at(0, config): weight decay on matrices only (none on biases
    and LayerNorm); the training loop sets each step's lr."""
    decay, no_decay = [], []
    for module in modules:
        for p in module.parameters():
            (decay if p.dim() >= 2 else no_decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr_at(0, config))


@dataclass
class Batch:
    """Encoder features and token ids of B examples (ids are lists: rows have different lengths)."""

    feats: Tensor                      # [B, N, C] frozen encoder features
    prefix: list[list[int]]            # chat-template text before the image
    suffix: list[list[int]]            # template text after the image, with the prompt
    answer: list[list[int]]            # target ids (the NLL is taken on these only)
    meta: dict = field(default_factory=dict)


def freeze(adapter: nn.Module) -> None:
    """Freeze the VLM: eval mode (no dropout) and requires_grad False on every parameter, asserted."""
    adapter.eval()
    adapter.requires_grad_(False)
    trainable = [name for name, p in adapter.named_parameters() if p.requires_grad]
    assert not trainable, f"VLM parameters still trainable: {trainable[:5]}"


def gated_features(scorer: nn.Module, denoiser: nn.Module, feats: Tensor, keep: int, tau: float,
                   generator: torch.Generator | None = None, count: int | None = None, denoise: str = "all"
                   ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Steps 1-4: feats [B, N, C] -> (denoised gated feats [B, M, C], alpha [B, N], positions [B, M] or
    None for all N). `count` = M < N: only the M highest-scoring tokens, at ascending original
    positions, are gated and denoised (the others count as dropped; module docstring). `denoise`
    "dropped": x_tilde + (1 - alpha) (Denoiser(x_tilde) - x_tilde), so a kept token (alpha = 1) reaches
    the projector unchanged, as at inference (module docstring)."""
    scores = scorer(feats)                                              # [B, N]
    # 1. z-score  2. soft top-K with per-row threshold (sum alpha = K)
    alpha = soft_topk(zscore(scores), keep, tau)                        # [B, N]
    positions = None
    if count is not None and count < feats.shape[1]:
        positions = scores.detach().topk(count, dim=-1).indices.sort(dim=-1).values    # [B, M]
        feats = feats.gather(1, positions.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
        kept_alpha = alpha.gather(1, positions)                         # [B, M]
    else:
        kept_alpha = alpha
    # 3. VP noise gate
    gated = vp_gate(feats, kept_alpha, generator=generator)             # [B, M, C]
    # 4. diagonal-attention Denoiser (token-wise: the same on M tokens as on N), before the frozen projector
    denoised = denoiser(gated)
    if denoise == "dropped":
        denoised = gated + (1 - kept_alpha).unsqueeze(-1) * (denoised - gated)
    return denoised, alpha, positions


def _prefix_kv(adapter, prefix: list[int], store: dict, device):
    """The LLM's key/value cache of a text prefix (no grad: it does not depend on the image), computed
    once per prefix and kept in `store`; each call gets its own copy (a forward appends to a cache)."""
    key = (tuple(prefix), str(device))
    if key not in store:
        with torch.no_grad():
            ids = torch.tensor([prefix], dtype=torch.long, device=device)
            out = adapter.llm(inputs_embeds=adapter.embed(ids), use_cache=True, logits_to_keep=1)
            cache = getattr(out, "cache", None)           # transformers >= 5.2x; older: past_key_values
            store[key] = cache if cache is not None else out.past_key_values
    return copy.deepcopy(store[key])


def answer_nll(adapter, image_tokens: Tensor, batch: Batch, positions: Tensor | None = None,
               num_image_tokens: int | None = None, prefix_cache: dict | None = None) -> Tensor:
    """Mean NLL of the answer tokens with the LLM input [prefix, image tokens, suffix, answer[:-1]].

    image_tokens [B, M, D] (after the projector); `positions` [B, M]: their ascending indices among the
    model's `num_image_tokens` N (None: all N, M = N), with "original" position ids, as an autoselect
    bundle lays out its K kept tokens (AutoSelect.default_positions; with all N tokens every mode is arange). Only the logits of the answer-predicting positions are
    computed (`logits_to_keep` with their indices), which spares the vocabulary projection elsewhere.
    `prefix_cache` (a dict the caller keeps): when every row has the same text prefix, its key/value cache
    is computed once and reused, so the LLM runs only from the image on (same loss, fewer tokens).
    """
    b, n, _ = image_tokens.shape
    shared = prefix_cache is not None and batch.prefix[0] and all(p == batch.prefix[0] for p in batch.prefix)
    skip = len(batch.prefix[0]) if shared else 0         # prefix tokens served from the cache
    total = n if num_image_tokens is None else num_image_tokens
    image_positions = (np.broadcast_to(np.arange(n), (b, n)) if positions is None
                       else positions.detach().cpu().numpy())
    device = image_tokens.device
    embed_dtype = adapter.embed(torch.zeros(1, 1, dtype=torch.long, device=device)).dtype
    rows, positions, targets = [], [], []
    for i in range(b):
        prefix, suffix, answer = batch.prefix[i], batch.suffix[i], batch.answer[i]
        if not answer:
            raise EdgepruneError("train: an example has an empty answer after tokenisation")
        text_after = suffix + answer[:-1]               # the last answer token is only a target
        pieces = [adapter.embed(torch.tensor([prefix], dtype=torch.long, device=device))[0]] if prefix and not skip else []
        pieces.append(image_tokens[i].to(embed_dtype))
        if text_after:
            pieces.append(adapter.embed(torch.tensor([text_after], dtype=torch.long, device=device))[0])
        rows.append(torch.cat(pieces, dim=0))                                   # [L_i, D]
        pos = sequence_positions(len(prefix), image_positions[i:i + 1], total, len(text_after), POSITIONS)[0]
        positions.append(torch.from_numpy(np.ascontiguousarray(pos[skip:])).to(device))
        first = len(prefix) - skip + n + len(suffix) - 1    # index (in the LLM input) whose logits predict answer[0]
        targets.append((first, answer))
    length = max(r.shape[0] for r in rows)
    embeds = torch.zeros(b, length, rows[0].shape[-1], dtype=embed_dtype, device=device)
    position_ids = torch.zeros(b, length, dtype=torch.long, device=device)
    for i, (r, p) in enumerate(zip(rows, positions)):
        embeds[i, :r.shape[0]] = r
        # padding continues the row's positions (it is never read: the LLM is causal)
        position_ids[i] = torch.cat([p, p[-1] + 1 + torch.arange(length - p.shape[0], device=device)])
    keep_idx = sorted({first + j for first, answer in targets for j in range(len(answer))})
    column = {pos: c for c, pos in enumerate(keep_idx)}
    cache = {}
    if skip:
        past = _prefix_kv(adapter, batch.prefix[0], prefix_cache, device)
        past.batch_repeat_interleave(b)
        # transformers >= 5.2x names the argument `cache` (past_key_values is deprecated); older 5.x: past_key_values
        cache = {"cache" if "cache" in inspect.signature(adapter.llm.forward).parameters else "past_key_values": past}
    # use_cache=True even without a prefix cache: with use_cache=False and no attention mask, transformers
    # reads position ids that jump (the kept tokens' original ids) as packed sequences and blocks attention
    # across the jumps (measured: another loss than the runtime's full causal attention).
    out = adapter.llm(inputs_embeds=embeds, position_ids=position_ids, use_cache=True, **cache,
                      logits_to_keep=torch.tensor(keep_idx, dtype=torch.long, device=device))
    logits = out.logits                                                          # [B, len(keep_idx), V]
    labels = torch.full(logits.shape[:2], -100, dtype=torch.long)
    for i, (first, answer) in enumerate(targets):
        for j, tok in enumerate(answer):
            labels[i, column[first + j]] = tok
    labels = labels.to(device)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def state_path(checkpoint: str | Path) -> Path:
    """Where the trainer state of a Scorer checkpoint lives: `<checkpoint>.trainer.pt` beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".trainer.pt")


class Trainer:
    """Trains `scorer` and `denoiser` on the frozen `adapter` (project, embed, llm) with batches from
    `batches(step) -> Batch` (a pure function of the step, for exact resume). The three modules must be
    on one device (the Scorer's is used); the noise generator stays on the CPU, so a run draws the same
    noise on any device."""

    def __init__(self, adapter: nn.Module, scorer: nn.Module, denoiser: Denoiser, config: TrainConfig,
                 batches: Callable[[int], Batch], regularizer: Callable[[Tensor, Batch], Tensor] | None = None):
        freeze(adapter)
        self.regularizer = regularizer     # (scores [B, N], batch) -> scalar added to the NLL (module docstring)
        self.regularizer_losses: list[float] = []
        self.adapter, self.scorer, self.denoiser = adapter, scorer, denoiser
        self.config, self.batches = config, batches
        self.step = 0
        self.recipe: str | None = None     # recipe id written into the Scorer file's metadata
        self._prefix_cache: dict = {}       # the LLM cache of a shared text prefix (answer_nll)
        self.losses: list[float] = []
        self.step_seconds: list[float] = []
        for module in (scorer, denoiser):
            module.requires_grad_(True)
        self.optimizer = adamw((scorer, denoiser), config)
        self.noise = torch.Generator().manual_seed(config.seed)

    @property
    def tau(self) -> float:
        c = self.config
        return tau_at(self.step, c.steps, c.tau_start, c.tau_end)

    def train_step(self) -> float:
        """One optimisation step at the current step's lr and tau; returns the loss."""
        c = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, c)
        self.scorer.train()
        self.denoiser.train()
        batch = self.batches(self.step)
        start = time.perf_counter()
        device = next(self.scorer.parameters()).device    # the caller places Scorer, Denoiser and VLM
        keep, n = c.keep_at(self.step), batch.feats.shape[1]
        feats, _, positions = gated_features(self.scorer, self.denoiser, batch.feats.to(device), keep, self.tau,
                                             self.noise, count=c.llm_count(keep, n), denoise=c.denoise)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=c.autocast):
            loss = answer_nll(self.adapter, self.adapter.project(feats), batch, positions, n,
                              prefix_cache=self._prefix_cache)
        if not torch.isfinite(loss):
            raise EdgepruneError(f"train: loss is {loss.item()} at step {self.step}; lower --lr")
        total = loss
        if self.regularizer is not None:
            extra = self.regularizer(self.scorer(batch.feats.to(device)), batch)
            self.regularizer_losses.append(float(extra.detach()))
            total = loss + extra
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        self.optimizer.step()
        self.step_seconds.append(time.perf_counter() - start)
        self.step += 1
        self.losses.append(float(loss.detach()))
        return self.losses[-1]

    def train(self, checkpoint: str | Path | None = None, progress: bool = False,
              until: int | None = None) -> list[float]:
        """Run steps up to `until` (default config.steps); checkpoint every save_every steps and at the end."""
        from tqdm import tqdm

        c = self.config
        until = c.steps if until is None else min(until, c.steps)
        bar = tqdm(total=c.steps, initial=self.step, disable=not progress, desc="train", unit="step",
                   dynamic_ncols=True)
        with bar:
            while self.step < until:
                loss = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tau=f"{self.tau:.3f}")
                if checkpoint is not None and c.save_every and self.step % c.save_every == 0 and self.step < until:
                    self.save(checkpoint)
        if checkpoint is not None:
            self.save(checkpoint)
        return self.losses

    # -- checkpoints --------------------------------------------------------------------------------
    def save(self, checkpoint: str | Path) -> Path:
        """Scorer via save_scorer at `checkpoint`, trainer state at state_path(checkpoint); both atomic."""
        from edgeprune.pruners.autoselect import save_scorer

        checkpoint = Path(checkpoint)
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = checkpoint.with_name(f".{checkpoint.name}.tmp")
        save_scorer(self.scorer, tmp, recipe=self.recipe)
        state = {
            "format": 1, "step": self.step, "config": asdict(self.config), "losses": self.losses,
            "regularizer_losses": self.regularizer_losses,
            "denoiser": self.denoiser.state_dict(),
            "denoiser_config": {"dim": self.denoiser.dim, "heads": self.denoiser.heads,
                                "mlp_ratio": self.denoiser.mlp_ratio},
            "optimizer": self.optimizer.state_dict(),
            "noise_rng": self.noise.get_state(), "torch_rng": torch.get_rng_state(),
        }
        tmp_state = state_path(tmp)
        torch.save(state, tmp_state)
        os.replace(tmp, checkpoint)
        os.replace(tmp_state, state_path(checkpoint))
        return checkpoint

    def resume(self, checkpoint: str | Path) -> None:
        """Restore Scorer, Denoiser, optimizer, step, losses and RNG from a checkpoint of `save`."""
        from edgeprune.pruners.autoselect import load_scorer

        checkpoint = Path(checkpoint)
        sp = state_path(checkpoint)
        if not checkpoint.is_file() or not sp.is_file():
            raise EdgepruneError(f"train: cannot resume from {checkpoint}: expected {checkpoint.name} and "
                                 f"{sp.name} written by `edgeprune train`")
        state = torch.load(sp, map_location="cpu", weights_only=True)
        saved = state["config"]
        if saved["keep"] != self.config.keep:
            raise EdgepruneError(f"train: resume with keep={self.config.keep}, the checkpoint was trained "
                                 f"with keep={saved['keep']}")
        if tuple(saved.get("keeps", ())) != self.config.keeps:
            raise EdgepruneError(f"train: resume with keeps={self.config.keeps}, the checkpoint was trained "
                                 f"with keeps={tuple(saved.get('keeps', ()))}")
        changed = {f.name: (saved.get(f.name), getattr(self.config, f.name)) for f in fields(self.config)
                   if saved.get(f.name) != getattr(self.config, f.name)}
        if changed:
            log.warning("resuming with changed settings (checkpoint -> now): %s", changed)
        try:
            self.scorer.load_state_dict(load_scorer(checkpoint).state_dict())
            self.denoiser.load_state_dict(state["denoiser"])
        except RuntimeError as err:
            raise EdgepruneError(f"train: {checkpoint} does not fit this model's Scorer/Denoiser: {err}") from err
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.losses = list(state["losses"])
        self.regularizer_losses = list(state.get("regularizer_losses", []))
        self.noise.set_state(state["noise_rng"])
        torch.set_rng_state(state["torch_rng"])
