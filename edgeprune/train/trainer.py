"""AutoSelect training loop (METHODS.md, AutoSelect, Training): the VLM is frozen, only the Scorer and
the Denoiser learn, the loss is the next-token NLL of the answer tokens.

One step:  feats [B,N,C] -> Scorer -> z-score -> soft top-K alpha (tau) -> VP noise gate -> Denoiser
           -> frozen projector -> frozen LLM on [prefix, N image tokens, prompt suffix, answer]
           -> NLL of the answer tokens only.
Every N tokens are fed at training (the gate does the "pruning"), with the adapter's 1-D position rule
(with K = N both `original` and `compact` are plain arange).

Not in the spec, chosen here: AdamW (weight decay 0.01 on matrices only), linear warmup then cosine
decay of the learning rate to 10 % of its peak, gradient clipping at norm 1.0, right padding (the
LLM is causal, so padding after a row's last token cannot reach it; no attention mask is needed).
A checkpoint is the Scorer file (`save_scorer`, what `build("autoselect", scorer=PATH)` loads) plus
`<PATH>.trainer.pt` beside it (Denoiser, optimizer, step, RNG states, config, losses) for resume.
Batches are a pure function of (seed, step), so a resumed run equals an uninterrupted one.
"""
from __future__ import annotations

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
from edgeprune.runtime.positions import sequence_positions
from edgeprune.train.denoiser import Denoiser
from edgeprune.train.noise_gate import vp_gate
from edgeprune.train.soft_topk import soft_topk, zscore

__all__ = ["TrainConfig", "Batch", "Trainer", "tau_at", "lr_at", "gated_features", "answer_nll",
           "state_path", "freeze"]

log = logging.getLogger(__name__)


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

    def __post_init__(self):
        checks = [("keep", self.keep >= 1, ">= 1"), ("steps", self.steps >= 1, ">= 1"), ("lr", self.lr > 0, "> 0"),
                  ("batch_size", self.batch_size >= 1, ">= 1"), ("grad_clip", self.grad_clip > 0, "> 0"),
                  ("tau_start", self.tau_start > 0, "> 0"),
                  ("tau_end", 0 < self.tau_end <= self.tau_start, "in (0, tau_start]"),
                  ("warmup", self.warmup is None or self.warmup >= 0, ">= 0"),
                  ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
                  ("save_every", self.save_every >= 0, ">= 0")]
        for name, ok, expected in checks:
            if not ok:
                raise EdgepruneError(f"train: {name}={getattr(self, name)!r}, expected {expected}")

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
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Steps 1-4: feats [B, N, C] -> (denoised gated feats [B, N, C], alpha [B, N])."""
    scores = scorer(feats)                                              # [B, N]
    # 1. z-score  2. soft top-K with per-row threshold (sum alpha = K)
    alpha = soft_topk(zscore(scores), keep, tau)                        # [B, N]
    # 3. VP noise gate
    gated = vp_gate(feats, alpha, generator=generator)                  # [B, N, C]
    # 4. diagonal-attention Denoiser, before the frozen projector
    return denoiser(gated), alpha


def answer_nll(adapter, image_tokens: Tensor, batch: Batch) -> Tensor:
    """Mean NLL of the answer tokens with the LLM input [prefix, image tokens, suffix, answer[:-1]].

    image_tokens [B, N, D] (after the projector). Only the logits of the answer-predicting positions are
    computed (`logits_to_keep` with their indices), which spares the vocabulary projection elsewhere.
    """
    b, n, _ = image_tokens.shape
    device = image_tokens.device
    embed_dtype = adapter.embed(torch.zeros(1, 1, dtype=torch.long, device=device)).dtype
    rows, positions, targets = [], [], []
    for i in range(b):
        prefix, suffix, answer = batch.prefix[i], batch.suffix[i], batch.answer[i]
        if not answer:
            raise EdgepruneError("train: an example has an empty answer after tokenisation")
        text_after = suffix + answer[:-1]               # the last answer token is only a target
        pieces = [adapter.embed(torch.tensor([prefix], dtype=torch.long, device=device))[0]] if prefix else []
        pieces.append(image_tokens[i].to(embed_dtype))
        if text_after:
            pieces.append(adapter.embed(torch.tensor([text_after], dtype=torch.long, device=device))[0])
        rows.append(torch.cat(pieces, dim=0))                                   # [L_i, D]
        pos = sequence_positions(len(prefix), np.arange(n)[None], n, len(text_after),
                                 getattr(adapter, "default_positions", "original"))[0]
        positions.append(torch.from_numpy(np.ascontiguousarray(pos)).to(device))
        first = len(prefix) + n + len(suffix) - 1       # position whose logits predict answer[0]
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
    out = adapter.llm(inputs_embeds=embeds, position_ids=position_ids, use_cache=False,
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
                 batches: Callable[[int], Batch]):
        freeze(adapter)
        self.adapter, self.scorer, self.denoiser = adapter, scorer, denoiser
        self.config, self.batches = config, batches
        self.step = 0
        self.losses: list[float] = []
        self.step_seconds: list[float] = []
        decay, no_decay = [], []
        for module in (scorer, denoiser):
            for p in module.parameters():
                p.requires_grad_(True)
                (decay if p.dim() >= 2 else no_decay).append(p)   # no decay on biases and LayerNorm
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr_at(0, config))
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
        feats, _ = gated_features(self.scorer, self.denoiser, batch.feats.to(device), c.keep, self.tau, self.noise)
        loss = answer_nll(self.adapter, self.adapter.project(feats), batch)
        if not torch.isfinite(loss):
            raise EdgepruneError(f"train: loss is {loss.item()} at step {self.step}; lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
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
        save_scorer(self.scorer, tmp)
        state = {
            "format": 1, "step": self.step, "config": asdict(self.config), "losses": self.losses,
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
        self.noise.set_state(state["noise_rng"])
        torch.set_rng_state(state["torch_rng"])
