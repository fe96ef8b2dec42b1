"""The two kernel sets the decoder replay (export/llm.py, DecoderGraph) is written in.

`FusedOps` emits ONNX Runtime's contrib kernels, so that one decode step runs about ten kernels per layer:
SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization (RMSNorm with the residual add folded in) and
GroupQueryAttention on the packed QKV projection with the rotary embedding applied inside it (`do_rotary`).
`PlainOps` writes the same computation in standard opset-17 ONNX (the TensorRT-friendly variant).

Rotary inside GroupQueryAttention with our position ids (measured on onnxruntime 1.32, CPU): the op reads
explicit `position_ids` per token in decode, but in a prompt it uses only the first id + i unless
`query_seqlens` is given; with `query_seqlens` every token's id is honoured, also for batch > 1 and with the
shared past/present buffer. M-RoPE ([3, B, L] ids, several ids per token) cannot index one cos/sin table, so
the cache GroupQueryAttention reads is built per call: row b*L + i holds cos/sin of token (b, i) computed by
the model's own rotary module (any rope type, M-RoPE sections included), and the op's position ids are those
row numbers. The cache is padded to at least total_sequence_length rows (an input check of the op).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["FusedOps", "PlainOps", "Context", "fused_qkv", "lm_head", "additive_mask", "plain_attention", "rotate_half"]

ORT_DOMAIN = "com.microsoft"


def _unused(g):
    """An absent optional input of a contrib op (an empty name in ONNX)."""
    node = g.op("prim::Constant")
    node.setType(torch._C.OptionalType.ofTensor())
    return node


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rms_norm(x, weight, eps: float):
    """RMSNorm as the HF Llama/Qwen modules compute it: statistics in float32, then weight * x in x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class _SimplifiedLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        return rms_norm(x, weight, eps)

    @staticmethod
    def symbolic(g, x, weight, eps):
        return g.op("SimplifiedLayerNormalization", x, weight, axis_i=-1, epsilon_f=eps, stash_type_i=1)


class _SkipSimplifiedLayerNorm(torch.autograd.Function):
    """(norm(x + delta), x + delta) in one kernel."""

    @staticmethod
    def forward(ctx, delta, x, weight, eps: float):
        total = x + delta
        return rms_norm(total, weight, eps), total

    @staticmethod
    def symbolic(g, delta, x, weight, eps):
        out, _, _, total = g.op(f"{ORT_DOMAIN}::SkipSimplifiedLayerNormalization", delta, x, weight, epsilon_f=eps,
                                outputs=4)
        out.setType(x.type())
        total.setType(x.type())
        return out, total


class _GroupQueryAttention(torch.autograd.Function):
    """Exports as com.microsoft::GroupQueryAttention (rotary inside, explicit position ids, query_seqlens).

    The torch forward is the causal reference without padding (tracing needs its shapes, tests its values)."""

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, seqlens_k, total_len, cos, sin, rope_ids, query_seqlens,
                num_heads: int, kv_heads: int, scale: float):
        b, l, _ = q.shape
        hd = past_k.shape[-1]
        if k is None:                                                       # packed [B, L, (H + 2 KV) * hd]
            q, k, v = q.split([num_heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
        qh = q.reshape(b, l, num_heads, hd).transpose(1, 2)                # [B, H, L, hd]
        kh = k.reshape(b, l, kv_heads, hd).transpose(1, 2)                 # [B, KV, L, hd]
        c = torch.cat([cos[rope_ids], cos[rope_ids]], dim=-1).unsqueeze(1)  # [B, 1, L, hd]
        s = torch.cat([sin[rope_ids], sin[rope_ids]], dim=-1).unsqueeze(1)
        qh, kh = qh * c + rotate_half(qh) * s, kh * c + rotate_half(kh) * s
        present_k = torch.cat([past_k, kh], dim=2)                          # [B, KV, T, hd]
        present_v = torch.cat([past_v, v.reshape(b, l, kv_heads, hd).transpose(1, 2)], dim=2)
        out = plain_attention(qh, present_k, present_v, None, scale=scale)  # [B, H, L, hd]
        return out.transpose(1, 2).reshape(b, l, num_heads * hd), present_k, present_v

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, seqlens_k, total_len, cos, sin, rope_ids, query_seqlens, num_heads,
                 kv_heads, scale):
        k = _unused(g) if k is None else k
        v = _unused(g) if v is None else v
        absent = [_unused(g) for _ in range(6)]  # attention_bias, head_sink, k/v_scale, q/k_norm_weight
        out, present_k, present_v = g.op(
            f"{ORT_DOMAIN}::GroupQueryAttention", q, k, v, past_k, past_v, seqlens_k, total_len, cos, sin, rope_ids,
            *absent, query_seqlens, num_heads_i=num_heads, kv_num_heads_i=kv_heads, scale_f=scale, do_rotary_i=1,
            outputs=3)
        out.setType(q.type().with_sizes([None, None, None]))
        present_k.setType(past_k.type().with_sizes([None] * 4))
        present_v.setType(past_v.type().with_sizes([None] * 4))
        return out, present_k, present_v


class _LinearRows(torch.autograd.Function):
    """x [B, D] @ weight[V, D]^T as Gemm(transB=1): the weight keeps its [V, D] row layout in the file (the exporter
    would fold a transpose into a [D, V] copy), so a tied LM head doubles as the embedding table the runtime reads."""

    @staticmethod
    def forward(ctx, x, weight):
        return x @ weight.t()

    @staticmethod
    def symbolic(g, x, weight):
        return g.op("Gemm", x, weight, transB_i=1)


def lm_head(x, module: nn.Linear):
    """The LM head on [B, D] hidden states -> [B, V], its weight stored as [V, D] rows (bias added when present)."""
    out = _LinearRows.apply(x, module.weight)
    return out if module.bias is None else out + module.bias


def plain_attention(q, k, v, mask, *, scale: float):
    """q [B, H, L, hd], k/v [B, KV, T, hd], mask [B, 1, 1, L, T] additive or None (= causal, no padding)."""
    b, h, l, hd = q.shape
    kv, t = k.shape[1], k.shape[2]
    # grouped query heads share a KV head: broadcast MatMul over a group axis instead of repeating K/V
    qg = q.reshape(b, kv, h // kv, l, hd)                                   # [B, KV, G, L, hd]
    scores = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)) * scale    # [B, KV, G, L, T]
    if mask is None:
        mask = additive_mask(torch.ones(b, t, dtype=torch.int64), l, q.dtype)
    # softmax in float32 as the HF eager path does; fp16 exp overflows otherwise
    probs = torch.softmax(scores.float() + mask.float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs, v.unsqueeze(2))                               # [B, KV, G, L, hd]
    return out.reshape(b, h, l, hd)


def additive_mask(attention_mask, length: int, dtype):
    """attention_mask [B, T] (1 = attend) -> [B, 1, 1, L, T]: 0 where the query may look, finfo.min elsewhere.

    The L queries are the last L of the T positions, in sequence order (causality follows the sequence, not the
    position ids, which may have gaps).
    """
    t = attention_mask.shape[1]
    key_idx = torch.arange(t)                                               # [T]
    query_idx = torch.arange(length) + (t - length)                         # [L]
    causal = key_idx.unsqueeze(0) <= query_idx.unsqueeze(1)                 # [L, T]
    allowed = causal.unsqueeze(0) & (attention_mask.unsqueeze(1) == 1)      # [B, L, T]
    zero = torch.zeros((), dtype=dtype)
    neg = torch.tensor(torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, zero, neg)[:, None, None]                   # [B, 1, 1, L, T]


class Context(dict):
    """What every layer of one decoder call shares (rotary tables, lengths or mask), computed once per call."""


class _Ops:
    """The interface DecoderGraph uses. `heads`: (num_heads, kv_heads, head_dim); `rotary`: the model's module."""

    def __init__(self, rotary: nn.Module, heads: tuple[int, int, int], scale: float):
        self.rotary = rotary
        self.num_heads, self.kv_heads, self.head_dim = heads
        self.scale = scale

    def split_qkv(self, qkv):
        hd = self.head_dim
        return qkv.split([self.num_heads * hd, self.kv_heads * hd, self.kv_heads * hd], dim=-1)


class FusedOps(_Ops):
    """ONNX Runtime contrib kernels (module docstring)."""

    def context(self, inputs_embeds, position_ids, attention_mask) -> Context:
        half = self.head_dim // 2
        cos, sin = self.rotary(inputs_embeds, position_ids)                 # [B, L, hd], the model's rope
        cos = cos[..., :half].reshape(-1, half)                             # [B*L, hd/2]: row b*L + i
        sin = sin[..., :half].reshape(-1, half)
        # the op checks cache rows >= total_sequence_length: pad with zero rows it never reads
        pad = (attention_mask[0].to(cos.dtype) * 0).unsqueeze(-1).expand(-1, half)  # [T, hd/2]
        ids = position_ids[0] if position_ids.dim() == 3 else position_ids          # [B, L] (for its shape)
        rows = torch.ones_like(ids).reshape(-1).cumsum(0) - 1               # 0 .. B*L-1, dynamic B and L
        lengths = attention_mask.sum(dim=1).to(torch.int32)                 # [B] right padding only
        new = torch.ones_like(ids).sum(dim=1).to(torch.int32)               # [B] = L
        return Context(cos=torch.cat([cos, pad]), sin=torch.cat([sin, pad]), rope_ids=rows.reshape(ids.shape),
                       seqlens_k=lengths - 1, query_seqlens=torch.minimum(lengths, new),
                       total_len=torch.ones_like(attention_mask[0]).sum().to(torch.int32))  # [] = past + L

    def norm(self, x, module):
        return _SimplifiedLayerNorm.apply(x, module.weight, float(module.variance_epsilon))

    def add_norm(self, delta, x, module):
        return _SkipSimplifiedLayerNorm.apply(delta, x, module.weight, float(module.variance_epsilon))

    def attention(self, qkv, attn: nn.Module, ctx: Context, past_k, past_v):
        k = v = None
        if hasattr(attn, "q_norm"):  # Qwen3: per-head norms before rotary (the op's own q/k norm is CUDA-only)
            q, k, v = self.split_qkv(qkv)
            q = self.norm(q.unflatten(-1, (self.num_heads, self.head_dim)), attn.q_norm).flatten(-2)
            k = self.norm(k.unflatten(-1, (self.kv_heads, self.head_dim)), attn.k_norm).flatten(-2)
            qkv = q
        return _GroupQueryAttention.apply(qkv, k, v, past_k, past_v, ctx["seqlens_k"], ctx["total_len"], ctx["cos"],
                                          ctx["sin"], ctx["rope_ids"], ctx["query_seqlens"], self.num_heads,
                                          self.kv_heads, self.scale)


class PlainOps(_Ops):
    """Standard ONNX: HF's norm modules, rotary by rotate_half, attention by MatMul/Softmax with a mask."""

    def context(self, inputs_embeds, position_ids, attention_mask) -> Context:
        cos, sin = self.rotary(inputs_embeds, position_ids)                 # [B, L, hd] each
        return Context(cos=cos.unsqueeze(2), sin=sin.unsqueeze(2),          # [B, L, 1, hd]
                       mask=additive_mask(attention_mask, inputs_embeds.shape[1], inputs_embeds.dtype))

    def norm(self, x, module):
        return module(x)

    def add_norm(self, delta, x, module):
        x = x + delta
        return module(x), x

    def attention(self, qkv, attn: nn.Module, ctx: Context, past_k, past_v):
        b, l, _ = qkv.shape
        q, k, v = self.split_qkv(qkv)
        q = q.reshape(b, l, self.num_heads, self.head_dim)                  # [B, L, H, hd]
        k = k.reshape(b, l, self.kv_heads, self.head_dim)                   # [B, L, KV, hd]
        if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms come before rotary
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = ctx["cos"], ctx["sin"]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        present_k = torch.cat([past_k, k.transpose(1, 2)], dim=2)          # [B, KV, T, hd]
        present_v = torch.cat([past_v, v.reshape(b, l, self.kv_heads, self.head_dim).transpose(1, 2)], dim=2)
        out = plain_attention(q.transpose(1, 2), present_k, present_v, ctx["mask"], scale=self.scale)
        return out.transpose(1, 2).reshape(b, l, self.num_heads * self.head_dim), present_k, present_v


def fused_qkv(attn: nn.Module) -> nn.Linear:
    """One Linear for q_proj, k_proj and v_proj (rows stacked in that order, biases too when present)."""
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    weight = torch.cat([p.weight.detach() for p in projs], dim=0)
    bias = [p.bias for p in projs]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias[0] is not None, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias[0] is not None:
            out.bias.copy_(torch.cat([b.detach() for b in bias]))
    return out.requires_grad_(False)

