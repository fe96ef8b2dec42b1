"""Between layer L-1 and L: score, select, gather (METHODS_INLLM.md §1, common steps 1-7).

`StageRunner` applies a built in-LLM method inside a prefill. The exported prefill graph
(export/inllm.py, through DecoderGraph's stage hook) and the torch reference (inllm/loop.py) both call
`StageRunner.apply` between two layers, so they cannot disagree on anything but kernels.

Sequence layout of a prefill row: [prefix: S | image slots: n | text: M, right-padded]. S and every
count are Python ints fixed when the runner is built (static shapes in the graph); the text length
and the batch stay dynamic. Positions are gathered, never renumbered; text and prefix are only
carried through. KV policy for the layers already run: "uniform" gathers their cache with the same
slots (one cache length, one decode mask), "faithful" leaves them whole (one KV group per stage).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from edgeprune.errors import PrunerConfigError
from edgeprune.inllm.base import KV_POLICIES, LLMStage, Stage, StageChoice, StageSignals
from edgeprune.pruners.ops import NEG_INF, exporting, gather_rows, sort_by_position

__all__ = ["StageRunner", "PrefillState", "LLMParts", "last_token_attention", "rotate_half"]


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class LLMParts:
    """The modules of a Llama-style causal LM the boundary reads (its own, not copies)."""

    layers: nn.ModuleList
    rotary: nn.Module
    norm: nn.Module            # RMSNorm_final
    num_heads: int
    kv_heads: int
    head_dim: int
    scale: float
    # one fused q/k/v Linear per layer (rows q, k, v), when the caller runs those instead of the model's own
    # q_proj/k_proj/v_proj (the exported graph, export/llm.py fused_qkv): the query rows are projected with it
    qkv: nn.ModuleList | None = None

    @classmethod
    def of(cls, llm: nn.Module) -> "LLMParts":
        body, cfg = llm.model, llm.config
        heads = cfg.num_attention_heads
        return cls(layers=body.layers, rotary=body.rotary_emb, norm=body.norm, num_heads=heads,
                   kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                   head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                   scale=float(body.layers[0].self_attn.scaling))


@dataclass
class PrefillState:
    """The prefill between two layers."""

    hidden: Tensor             # [B, Lt, D] output of the layer just run (input of the next)
    layer_input: Tensor        # [B, Lt, D] input of the layer just run (for the query rows)
    position_ids: Tensor       # [B, Lt] or [3, B, Lt] (M-RoPE)
    attention_mask: Tensor     # [B, Lt] int64, 1 = valid; right padding only
    presents: list             # [k0, v0, k1, v1, ...] of the layers run so far, [B, Hkv, len, dh]
    slots: Tensor              # [B, n] int64: original slot (0..K-1) of each current image token, ascending
    image_positions: Tensor    # [B, K] int64: grid index of each original slot (the vision graph's positions)


def last_token_attention(parts: LLMParts, layer: int, layer_input: Tensor, keys: Tensor, position_ids: Tensor,
                         attention_mask: Tensor) -> Tensor:
    """A^(layer)[last valid token, :] [B, Lt] in fp32: head-mean softmax of the last token's query against the
    layer's post-RoPE keys [B, Hkv, Lt, dh]. Only this row is computed (one q projection); the model keeps its
    fused attention (NOTES.md: sdpa and GroupQueryAttention return no probabilities)."""
    b = layer_input.shape[0]
    module = parts.layers[layer]
    last = attention_mask.sum(dim=1) - 1                                          # [B] right padding
    x = gather_rows(layer_input, last.unsqueeze(1))                               # [B, 1, D]
    h = module.input_layernorm(x)
    if parts.qkv is None:
        q = module.self_attn.q_proj(h)
    else:   # the whole fused row, then its q part: the graph reads the one weight the layer itself uses
        q = parts.qkv[layer](h)[..., :parts.num_heads * parts.head_dim]
    q = q.reshape(b, 1, parts.num_heads, parts.head_dim)
    if hasattr(module.self_attn, "q_norm"):  # Qwen3-style per-head norm before rotary
        q = module.self_attn.q_norm(q)
    if position_ids.dim() == 3:                                                   # M-RoPE [3, B, Lt]
        pos = torch.gather(position_ids, 2, last.view(1, b, 1).expand(3, b, 1))  # [3, B, 1]
    else:
        pos = torch.gather(position_ids, 1, last.unsqueeze(1))                   # [B, 1]
    cos, sin = parts.rotary(x, pos)                                               # [B, 1, dh]
    q = q * cos.unsqueeze(2) + rotate_half(q) * sin.unsqueeze(2)                  # [B, 1, H, dh]
    q = q.reshape(b, parts.kv_heads, parts.num_heads // parts.kv_heads, parts.head_dim).float()  # GQA groups
    scores = torch.matmul(q, keys.float().transpose(-1, -2)) * parts.scale       # [B, Hkv, G, Lt]
    # every key up to the last valid token is a valid token: the padding mask is the causal mask here
    scores = torch.where(attention_mask.bool().view(b, 1, 1, -1), scores, torch.tensor(NEG_INF))
    return torch.softmax(scores, dim=-1).mean(dim=(1, 2))                         # [B, Lt]


class StageRunner(nn.Module):
    """A built in-LLM method bound to one model and prompt layout: its `stages`, the KV policy, and `apply`."""

    def __init__(self, method: LLMStage, *, num_image: int, num_layers: int, image_start: int,
                 kv_policy: str = "uniform", grid: tuple[int, int] | None = None):
        super().__init__()
        if kv_policy not in KV_POLICIES:
            raise PrunerConfigError(f"kv_policy={kv_policy!r}, expected one of {', '.join(KV_POLICIES)}")
        if "positions" in method.requires and grid is None:
            raise PrunerConfigError(f"{method.name}: needs the image grid (slot positions) and none was given")
        self.method = method
        self.stages: tuple[Stage, ...] = method.bind(num_image, num_layers)
        self.num_image, self.num_layers, self.image_start = num_image, num_layers, image_start
        self.kv_policy, self.grid = kv_policy, grid

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(s.layer for s in self.stages)

    @property
    def num_kept(self) -> int:
        return self.stages[-1].num_out

    def kv_groups(self) -> tuple[int, ...]:
        """First layer of each group of layers whose caches share one length (one decode mask each)."""
        return (0,) if self.kv_policy == "uniform" else (0, *self.layers)

    def plan(self):
        """The runtime's view of these stages (runtime/stages.py StagePlan)."""
        from edgeprune.runtime.stages import StagePlan

        return StagePlan(method=self.method.name, stages=tuple((s.layer, s.num_in, s.num_out) for s in self.stages),
                         kv_policy=self.kv_policy, image_start=self.image_start, num_layers=self.num_layers,
                         min_text_tokens=self.method.min_text_tokens)

    def initial_slots(self, image_positions: Tensor) -> Tensor:
        """[B, K] slots 0..K-1 of every row (derived from a tensor so the batch stays dynamic)."""
        return torch.arange(self.num_image, device=image_positions.device).unsqueeze(0).expand_as(image_positions)

    # -- the boundary ----------------------------------------------------------------------------------
    def apply(self, layer: int, state: PrefillState, parts: LLMParts) -> PrefillState:
        """Run the stage whose first reduced layer is `layer` on the state after layer `layer - 1`."""
        stage = self.stages[self.layers.index(layer)]
        s, n = self.image_start, stage.num_in
        if stage.num_out == stage.num_in:   # K2 = K: the identity stage (the gathers below still run)
            choice = StageChoice(keep=state.slots.new_tensor(range(n)).unsqueeze(0).expand_as(state.slots))
        else:
            choice = self.method.select(self._signals(stage, state, parts), stage)

        # 2. ascending slot order (TopK over the K2 kept, never over n); merged states follow their slot
        if choice.hidden is None:
            (keep,) = sort_by_position(choice.keep)
        else:
            keep, image = sort_by_position(choice.keep, choice.hidden)
        h = state.hidden

        # 3.-4. keep index [0..S-1] ++ (S + keep) ++ [S+n ..], built once: gather hidden states, positions, mask
        index = keep_index(keep, s, n, state.attention_mask)                     # [B, Lt - n + K2]
        if choice.hidden is None:
            hidden = gather_rows(h, index)                                       # [B, Lt - n + K2, D]
        else:   # merged states replace the image span
            hidden = torch.cat([h[:, :s], image.to(h.dtype), h[:, s + n:]], dim=1)
        pos = state.position_ids
        if pos.dim() == 3:                                                       # M-RoPE [3, B, Lt]
            pos = torch.gather(pos, 2, index.unsqueeze(0).expand(3, -1, -1))
        else:
            pos = torch.gather(pos, 1, index)
        mask = torch.gather(state.attention_mask, 1, index)

        # 5. KV policy for the layers already run: every cache holds the current sequence [B, Hkv, Lt, dh] and
        # takes the same rows: one index into its [B*Hkv*Lt, dh] rows (a Gather copying dh values per index, where
        # a GatherElements would index every value)
        presents = state.presents
        if self.kv_policy == "uniform" and presents:
            b, hkv, dh = index.shape[0], parts.kv_heads, parts.head_dim
            lt = state.attention_mask.shape[1]
            heads = torch.arange(b * hkv, device=index.device).view(b, hkv, 1)         # row b*Hkv + h
            rows = heads * lt + index.unsqueeze(1)                                        # [B, Hkv, Lt - n + K2]
            presents = [p.reshape(-1, dh)[rows] for p in presents]                        # [B, Hkv, Lt - n + K2, dh]
        return replace(state, hidden=hidden, layer_input=None, position_ids=pos, attention_mask=mask,
                       presents=presents, slots=torch.gather(state.slots, 1, keep))

    def _signals(self, stage: Stage, state: PrefillState, parts: LLMParts) -> StageSignals:
        """What the method requires, from layer L-1, in fp32."""
        s, n, need = self.image_start, stage.num_in, self.method.requires
        text_mask = state.attention_mask[:, s + n:].bool()                        # [B, M]
        if not exporting() and self.method.min_text_tokens:
            short = (text_mask.sum(dim=1) < self.method.min_text_tokens).nonzero().flatten().tolist()
            if short:
                raise PrunerConfigError(f"{self.method.name}: row(s) {short} have "
                                        f"{text_mask.sum(dim=1)[short].tolist()} text token(s) after the image, "
                                        f"expected >= {self.method.min_text_tokens} (its text pivots)")
        signals = StageSignals(text_mask=text_mask, final_norm=parts.norm)
        h = state.hidden
        if "hidden" in need:
            signals.image_hidden, signals.text_hidden = h[:, s:s + n].float(), h[:, s + n:].float()
        keys = state.presents[2 * (stage.layer - 1)]                              # K^(L-1) [B, Hkv, Lt, dh]
        if "keys" in need:
            signals.image_keys, signals.text_keys = keys[:, :, s:s + n].float(), keys[:, :, s + n:].float()
        if "last_attn" in need:
            row = last_token_attention(parts, stage.layer - 1, state.layer_input, keys, state.position_ids,
                                       state.attention_mask)                      # [B, Lt]
            signals.last_attn = row[:, s:s + n]
        if "positions" in need:
            signals.positions = torch.gather(state.image_positions, 1, state.slots)  # [B, n]
            signals.grid = self.grid
        return signals

    def extra_repr(self) -> str:
        stages = ", ".join(f"L={st.layer}: {st.num_in}->{st.num_out}" for st in self.stages)
        return f"{self.method.name} [{stages}], kv_policy={self.kv_policy}, image_start={self.image_start}"


def keep_index(keep: Tensor, start: int, n: int, attention_mask: Tensor) -> Tensor:
    """[B, Lt - n + K2]: the sequence indices the stage keeps, [0..start-1] ++ (start + keep) ++ [start+n .. Lt-1],
    for keep [B, K2] (slots in the image span [start, start + n)); Lt is the mask's (dynamic) length."""
    ar = torch.arange(attention_mask.shape[1], device=keep.device)                # [Lt] (a Range: dynamic Lt)
    b = keep.shape[0]
    return torch.cat([ar[:start].unsqueeze(0).expand(b, -1), keep + start, ar[start + n:].unsqueeze(0).expand(b, -1)],
                     dim=1)
