"""Diagonal-attention Denoiser of AutoSelect training (METHODS.md, AutoSelect, step 4).

One pre-norm Transformer block whose attention mask is the identity: every token attends only to
itself, so the block is token-wise (output i depends on input i alone) and cannot move information
between tokens -- the Scorer's choice stays the only way content reaches the LLM. It sits between the
noise gate and the frozen projector during training and is dropped at inference.

Not in the spec: the two output projections (attention and MLP) start at zero, so the untrained
Denoiser is the identity and training starts from the frozen VLM's own loss (the "zero-init residual"
trick of adaLN-Zero / ReZero); with a random block the frozen projector would first see perturbed tokens.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from edgeprune.errors import PrunerConfigError
from edgeprune.pruners.ops import NEG_INF

__all__ = ["Denoiser", "diagonal_mask"]


def diagonal_mask(n: int, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Additive attention mask [N, N]: 0 on the diagonal, a large finite negative elsewhere (built from
    arange, not torch.eye(bool), which exports to an EyeLike that ONNX Runtime lacks)."""
    ar = torch.arange(n, device=device)
    same = ar.unsqueeze(1) == ar.unsqueeze(0)                             # [N, N] bool
    return torch.where(same, torch.zeros((), dtype=dtype, device=device),
                       torch.full((), NEG_INF, dtype=dtype, device=device))


class Denoiser(nn.Module):
    """One Transformer block (pre-norm, MHA + GELU MLP) with an identity attention mask.

    `heads` must divide `dim`. With one key per query the softmax is 1 and the attention reduces to
    out_proj(v_proj(LN(x))), whatever the head count; heads only shape the parameters.
    """

    def __init__(self, dim: int, heads: int = 1, mlp_ratio: float = 4.0):
        super().__init__()
        if dim < 1 or heads < 1 or dim % heads:
            raise PrunerConfigError(f"Denoiser: dim={dim}, heads={heads}; expected heads >= 1 dividing dim")
        self.dim, self.heads, self.mlp_ratio = dim, heads, mlp_ratio
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(round(dim * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        with torch.no_grad():  # identity at initialisation (see the module docstring)
            self.attn.out_proj.weight.zero_()
            self.attn.out_proj.bias.zero_()
            self.mlp[2].weight.zero_()
            self.mlp[2].bias.zero_()

    def forward(self, x: Tensor) -> Tensor:                               # [B, N, C]
        mask = diagonal_mask(x.shape[1], device=x.device, dtype=x.dtype)  # [N, N]
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))                                # [B, N, C]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, mlp_ratio={self.mlp_ratio}"
