"""AutoSelect: top-K by a learned per-token scorer on `feats` (METHODS.md, AutoSelect).

Inference only: s = Linear(TransformerEncoder_L(feats)), keep the K highest scores at their original
positions (`--positions original`). Training (soft top-K, noise gate, denoiser) lives in edgeprune.train
and trains the `Scorer` defined here; `save_scorer` / `load_scorer` are the checkpoint format
(safetensors, config in its metadata).

Choices where METHODS.md is silent: the blocks are pre-norm (LayerNorm -> attention -> residual,
LayerNorm -> 4x GELU MLP -> residual) with no final norm, as nn.TransformerEncoder(norm=None) with
norm_first=True; the attention is F.scaled_dot_product_attention on our own q/k/v projections (no
nn.MultiheadAttention, whose eval-mode fast path traces differently); no dropout. Default heads: the
largest of (8, 6, 4, 3, 2, 1) dividing the width (8 heads of 128 at CLIP-L's 1024).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeprune.errors import PrunerConfigError
from edgeprune.pruners._registry import register_pruner
from edgeprune.pruners.base import Pruner, Selection
from edgeprune.pruners.ops import gather_rows, sort_by_position, topk_indices

__all__ = ["AutoSelect", "Scorer", "save_scorer", "load_scorer", "default_heads"]

_META = "edgeprune.scorer."  # safetensors metadata prefix: dim, depth, heads, format
_FORMAT = "1"


def default_heads(dim: int) -> int:
    """The largest of (8, 6, 4, 3, 2, 1) that divides dim (8 heads of 128 at CLIP-L's 1024)."""
    return next(h for h in (8, 6, 4, 3, 2, 1) if dim % h == 0)


class _Block(nn.Module):
    """Pre-norm Transformer encoder block; its own q/k/v/out projections around sdpa (no fast-path module)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:                             # [B, N, C]
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        # sdpa: a fused kernel in eager mode (no [B, H, N, N] tensor at N=2880); the legacy exporter
        # writes it out as MatMul/Softmax/MatMul. No mask, no dropout, default scale 1/sqrt(C/H).
        att = F.scaled_dot_product_attention(q, k, v)                  # [B, H, N, C/H]
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, c))        # [B, N, C]
        return x + self.mlp(self.norm2(x))


class Scorer(nn.Module):
    """Per-token score s = Linear(TransformerEncoder_depth(feats)): [B, N, dim] -> [B, N]."""

    def __init__(self, dim: int, depth: int = 2, heads: int | None = None):
        super().__init__()
        heads = default_heads(dim) if heads is None else heads
        for name, value, low in (("dim", dim, 1), ("depth", depth, 0), ("heads", heads, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise PrunerConfigError(f"autoselect: {name}={value!r}, expected an integer >= {low}")
        if dim % heads:
            raise PrunerConfigError(f"autoselect: heads={heads} does not divide dim={dim}")
        self.dim, self.depth, self.heads = dim, depth, heads
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.head = nn.Linear(dim, 1)

    def forward(self, feats: Tensor) -> Tensor:                        # [B, N, dim]
        x = feats
        for block in self.blocks:
            x = block(x)
        return self.head(x).squeeze(-1)                                # [B, N]

    def config(self) -> dict[str, int]:
        return {"dim": self.dim, "depth": self.depth, "heads": self.heads}


def save_scorer(scorer: Scorer, path: str | Path) -> Path:
    """Write the scorer's weights with its config (dim, depth, heads) in the safetensors metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {_META + k: str(v) for k, v in scorer.config().items()} | {_META + "format": _FORMAT}
    save_file({k: v.detach().contiguous().cpu() for k, v in scorer.state_dict().items()}, str(path), metadata=meta)
    return path


def load_scorer(path: str | Path) -> Scorer:
    """Read a checkpoint written by `save_scorer`; anything else is a PrunerConfigError naming the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise PrunerConfigError(f"autoselect: scorer checkpoint {str(path)!r} does not exist, expected a "
                                f".safetensors file written by save_scorer (edgeprune train)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise PrunerConfigError(f"autoselect: scorer checkpoint {str(path)!r} is not a readable safetensors "
                                f"file ({e})") from e
    try:
        config = {k: int(meta[_META + k]) for k in ("dim", "depth", "heads")}
    except (KeyError, ValueError):
        raise PrunerConfigError(f"autoselect: scorer checkpoint {str(path)!r} has no scorer config in its "
                                f"metadata (expected {_META}dim/depth/heads); was it written by save_scorer?") from None
    scorer = Scorer(**config)
    try:
        scorer.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise PrunerConfigError(f"autoselect: scorer checkpoint {str(path)!r} does not match its config "
                                f"{config}: {e}") from e
    return scorer.eval()


@register_pruner("autoselect")
class AutoSelect(Pruner):
    """AutoSelect: top-K tokens by a learned Transformer scorer on encoder features."""

    requires = ("tokens", "feats")
    default_positions = "original"   # AutoSelect keeps the original RoPE ids (METHODS.md)

    def __init__(self, keep: int, scorer: str | Path | nn.Module | None = None, dim: int | None = None,
                 depth: int = 2, heads: int | None = None, seed: int = 0):
        super().__init__(keep)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise PrunerConfigError(f"autoselect: seed={seed!r}, expected an integer")
        for name, value, low in (("depth", depth, 0), ("heads", 1 if heads is None else heads, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:  # checked now, not lazily
                raise PrunerConfigError(f"autoselect: {name}={value!r}, expected an integer >= {low}")
        self.depth, self.heads, self.seed = depth, heads, seed
        if scorer is None:
            # No checkpoint: a randomly initialised scorer, seeded (deterministic, untrained: a
            # baseline and a shape stand-in). With dim=None it is built on the first call from
            # feats.shape[-1], with the same seed, so it is just as deterministic.
            self.scorer = None if dim is None else self._random_scorer(dim)
        else:
            if isinstance(scorer, (str, Path)):
                scorer = load_scorer(scorer)
            elif not isinstance(scorer, nn.Module):
                raise PrunerConfigError(f"autoselect: scorer={scorer!r}, expected None, a checkpoint path "
                                        f"or an nn.Module mapping feats [B, N, C] to scores [B, N]")
            # depth/heads describe a random scorer only; a given scorer brings its own config.
            got = getattr(scorer, "dim", None)
            if dim is not None and got is not None and got != dim:
                raise PrunerConfigError(f"autoselect: dim={dim} but the scorer's width is {got}")
            self.scorer = scorer.eval()  # no dropout, whatever the module was trained with

    def _random_scorer(self, dim: int) -> Scorer:
        with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG
            torch.manual_seed(self.seed)
            return Scorer(dim, self.depth, self.heads).eval()

    def select(self, tokens: Tensor, feats: Tensor) -> Selection:      # [B, N, D], [B, N, C]
        if self.scorer is None:  # lazy: dim was not given (see __init__)
            self.scorer = self._random_scorer(feats.shape[-1]).to(device=feats.device)
        width = getattr(self.scorer, "dim", feats.shape[-1])
        if feats.shape[-1] != width:
            raise PrunerConfigError(f"autoselect: feats have C={feats.shape[-1]}, the scorer expects C={width}")
        # 1. score every token, in the scorer's own dtype (float16 feats of a half-precision model included)
        weight = next(self.scorer.parameters(), None)
        scores = self.scorer(feats if weight is None else feats.to(weight.dtype))  # [B, N]
        # 2. top-K by score (ties to the lowest index), then ascending original positions.
        chosen = topk_indices(scores, self.keep)                       # [B, K]
        # The projector acts per token, so gathering the post-projector `tokens` equals projecting
        # the kept `feats`: the output is in `tokens` space without a second projector pass.
        positions, kept = sort_by_position(chosen, gather_rows(tokens, chosen))
        return Selection(tokens=kept, positions=positions)             # [B, K, D], [B, K]

    def extra_repr(self) -> str:
        return f"keep={self.keep}, seed={self.seed}"
