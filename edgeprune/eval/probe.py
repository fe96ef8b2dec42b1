"""LLM-free evaluation (AutoSelect §4.3): how much of the image a pruned token set still carries.

Each method chooses K patch tokens (its `positions`; merging methods count by their
representatives). The DINOv2 backbone runs again on [CLS] + only those patch embeddings, each with
its own position embedding (the patch-embedding output with positions, i.e. the input of layer 0,
gathered), through all layers and the final layer norm; a linear probe on that [CLS], trained on
unpruned training images, classifies. K = N gathers every patch: the unpruned forward exactly.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import Tensor

from edgeprune.errors import EdgepruneError

__all__ = ["rerun_cls", "LinearProbe", "train_probe", "probe_accuracy", "probe_sweep"]

log = logging.getLogger(__name__)


@torch.no_grad()
def rerun_cls(adapter, pixels: Tensor, positions: Tensor | None) -> Tensor:
    """Final [CLS] [B, C] of the adapter's ViT run on [CLS] + the patches at `positions` [B, K]
    (None: all patches)."""
    emb = adapter._embed(pixels)                                            # [B, 1+N, C] with positions
    if positions is not None:
        b, c = emb.shape[0], emb.shape[2]
        idx = torch.cat([torch.zeros(b, 1, dtype=torch.long), positions.long() + 1], dim=1)   # [B, 1+K]
        emb = emb.gather(1, idx.unsqueeze(-1).expand(-1, -1, c))           # [B, 1+K, C]
    for layer in adapter._layers():
        emb = layer(emb, None)
    return adapter.vision.layernorm(emb[:, 0])                              # [B, C]


class LinearProbe(torch.nn.Module):
    """Standardise (train statistics) + one linear layer."""

    def __init__(self, mean: Tensor, std: Tensor, classes: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = torch.nn.Linear(mean.shape[0], classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear((x - self.mean) / self.std)


def train_probe(cls: Tensor, labels, classes: int = 10, seed: int = 0, epochs: int = 300,
                weight_decay: float = 1e-3) -> LinearProbe:
    """Full-batch AdamW logistic regression on [CLS] features [M, C]; deterministic for a seed."""
    x, y = cls.float(), torch.as_tensor(np.asarray(labels), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    probe = LinearProbe(x.mean(0), x.std(0) + 1e-6, classes)
    with torch.no_grad():
        probe.linear.weight.copy_(torch.randn(probe.linear.weight.shape, generator=gen) * 0.01)
        probe.linear.bias.zero_()
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(epochs):
        loss = torch.nn.functional.cross_entropy(probe(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return probe.eval()


@torch.no_grad()
def probe_accuracy(probe: LinearProbe, cls: Tensor, labels) -> float:
    pred = probe(cls.float()).argmax(-1).numpy()
    return float(np.mean(pred == np.asarray(labels)))


@torch.no_grad()
def probe_sweep(adapter, cached, labels, probe: LinearProbe, methods, keeps, seed: int = 0,
                batch: int = 16, options: dict[str, dict] | None = None) -> tuple[float, list[dict]]:
    """(unpruned top-1 from the cached full [CLS], rows of {method, keep, n, top1, seconds, error});
    `options`: {method: pruner options}; rows carry the method's report label."""
    from edgeprune.eval.vlm import build_method, method_label
    from edgeprune.reference import encode_and_prune

    labels = np.asarray(labels)
    n = len(labels)
    full = probe_accuracy(probe, cached._signals["cls"], labels)
    rows = []
    full_rerun = None      # K = N is the same unpruned re-run for every method: computed once
    for name in methods:
        for k in keeps:
            start = time.time()
            method = name
            if k == adapter.num_image_tokens and full_rerun is not None:
                rows.append({**full_rerun, "method": method, "seconds": 0.0})
                continue
            try:
                pruner = build_method(adapter, name, k, seed=seed, **(options or {}).get(name, {}))
                method = method_label(name, pruner)
                preds = []
                for i in range(0, n, batch):
                    idx = torch.arange(i, min(n, i + batch))
                    pixels = adapter.preprocess([cached._images[int(j)] for j in idx])
                    if pruner is None:
                        positions = None
                    else:
                        _, positions = encode_and_prune(cached, pruner, idx)        # [b, K]
                    preds.append(probe(rerun_cls(adapter, pixels, positions)).argmax(-1))
                top1 = float(np.mean(torch.cat(preds).numpy() == labels))
                rows.append({"method": method, "keep": k, "n": n, "top1": top1, "seconds": time.time() - start,
                             "error": None})
                if pruner is None:
                    full_rerun = rows[-1]
            except EdgepruneError as err:
                rows.append({"method": method, "keep": k, "n": n, "top1": float("nan"),
                             "seconds": time.time() - start, "error": str(err)})
            log.info("probe %s K=%d: top-1 %.3f (%.0f s)", method, k, rows[-1]["top1"], rows[-1]["seconds"])
    return full, rows
