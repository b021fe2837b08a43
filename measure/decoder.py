"""One decoder for every workload family (GPT-J, GPT-2/Cerebras, MPT, Llama/Mistral), built from kfsim's workload YAML.

Weights are random (no download is possible; timing does not depend on their values). The layer structure
follows each family's Hugging Face implementation: GPT-J's parallel attention + MLP with partial interleaved
rotary; GPT-2's learned positions; MPT's ALiBi without biases; Llama's RMSNorm, SwiGLU and GQA. Q, K and V are
one fused projection (as gpt-fast does), so a step launches one GEMM for them.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kfsim.workload import Workload

from .kv_policies import FullCache


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(w: Workload) -> nn.Module:
    if w.norm == "rmsnorm":
        return RMSNorm(w.d_model)
    return nn.LayerNorm(w.d_model, bias=w.norm_bias)


def alibi_slopes(n_heads: int, bias_max: float = 8.0) -> torch.Tensor:
    """MPT's ALiBi slopes: 1 / 2^(bias_max * i / n) for heads i = 1..n (n rounded up to a power of two)."""
    n = 2 ** math.ceil(math.log2(n_heads))
    slopes = 1.0 / torch.pow(2, torch.arange(1, n + 1) * (bias_max / n))
    if n != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes


def alibi_bias(slopes: torch.Tensor, key_pos: torch.Tensor, query_pos, group: int = 1) -> torch.Tensor:
    """ALiBi bias slope_h x (key position - query position). Positions of every row alike ([S] keys, or [T, S]
    query-by-key) give [H, 1 or T, S]; an evicting cache's own positions per sequence and KV head ([B, Hkv, S])
    give [B, H, S], each KV head's positions repeated for its `group` query heads."""
    rel = (key_pos - query_pos).float()
    if rel.dim() <= 2:
        return slopes[:, None, None] * rel.reshape(-1, rel.shape[-1])[None]
    return slopes[None, :, None] * rel.repeat_interleave(group, dim=1)


def slopes_of(w: Workload) -> torch.Tensor | None:
    """The ALiBi slopes a full cache of `w` needs (measure.kv_policies.FullCache), or None for other positions."""
    return alibi_slopes(w.n_heads) if w.position == "alibi" else None


class Rotary(nn.Module):
    """Rotary embedding on the first `dim` of each head: GPT-J rotates interleaved pairs, Llama rotates halves."""

    def __init__(self, dim, theta, max_pos, interleaved):
        super().__init__()
        inv = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
        freqs = torch.outer(torch.arange(max_pos).float(), inv)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)
        self.dim, self.interleaved = dim, interleaved

    def forward(self, x, positions):
        """x [B, H, T, D]; positions [T] (long tensor)."""
        cos, sin = self.cos[positions].to(x.dtype), self.sin[positions].to(x.dtype)  # [T, dim/2]
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        if self.interleaved:
            a, b = rot[..., 0::2], rot[..., 1::2]
            rot = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
        else:
            a, b = rot.chunk(2, dim=-1)
            rot = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
        return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot


class Attention(nn.Module):
    def __init__(self, w: Workload):
        super().__init__()
        self.w = w
        self.qkv = nn.Linear(w.d_model, w.q_dim + 2 * w.kv_dim, bias=w.attn_bias)
        self.out = nn.Linear(w.q_dim, w.d_model, bias=w.attn_bias)
        if w.position == "alibi":
            self.register_buffer("slopes", alibi_slopes(w.n_heads), persistent=False)

    def _split(self, x):
        B, T, _ = x.shape
        w = self.w
        q, k, v = self.qkv(x).split([w.q_dim, w.kv_dim, w.kv_dim], dim=-1)
        q = q.view(B, T, w.n_heads, w.head_dim).transpose(1, 2)
        k = k.view(B, T, w.n_kv_heads, w.head_dim).transpose(1, 2)
        v = v.view(B, T, w.n_kv_heads, w.head_dim).transpose(1, 2)
        return q, k, v

    def bias_fn(self, key_pos, query_pos):
        """ALiBi bias slope_h x (key position - query position), shaped for the cache that asks."""
        return alibi_bias(self.slopes, key_pos, query_pos, self.w.n_heads // self.w.n_kv_heads)

    def forward(self, x, cache, positions, rotary, decode_pos=None):
        q, k, v = self._split(x)
        if rotary is not None:
            q, k = rotary(q, positions), rotary(k, positions)
        has_alibi = self.w.position == "alibi"
        if decode_pos is None:  # prefill
            bias = None
            if has_alibi and not (isinstance(cache, FullCache) and cache.slopes is not None):  # adds it itself
                bias = alibi_bias(self.slopes, positions[None, :], positions[:, None])
            y = cache.prefill(q, k, v, bias)
        else:
            y = cache.decode(q, k, v, decode_pos, self.bias_fn if has_alibi else None)
        B, H, T, D = y.shape
        return self.out(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, w: Workload):
        super().__init__()
        self.swiglu = w.ffn_type == "swiglu"
        up = 2 * w.ffn_dim if self.swiglu else w.ffn_dim  # SwiGLU: gate and up fused in one GEMM
        self.up = nn.Linear(w.d_model, up, bias=w.mlp_bias)
        self.down = nn.Linear(w.ffn_dim, w.d_model, bias=w.mlp_bias)

    def forward(self, x):
        h = self.up(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.down(h)


class Block(nn.Module):
    def __init__(self, w: Workload):
        super().__init__()
        self.parallel = w.parallel_residual
        self.norm1 = make_norm(w)
        self.attn = Attention(w)
        self.norm2 = None if self.parallel else make_norm(w)
        self.mlp = MLP(w)

    def forward(self, x, cache, positions, rotary, decode_pos=None):
        if self.parallel:  # GPT-J: one norm feeds attention and MLP; both add to the residual
            h = self.norm1(x)
            return x + self.attn(h, cache, positions, rotary, decode_pos) + self.mlp(h)
        x = x + self.attn(self.norm1(x), cache, positions, rotary, decode_pos)
        return x + self.mlp(self.norm2(x))


class Decoder(nn.Module):
    """A decoder-only transformer of workload `w`; `caches` (one per layer) hold the KV state of each policy."""

    def __init__(self, w: Workload, max_positions: int = 1 << 17):
        super().__init__()
        self.w = w
        self.embed = nn.Embedding(w.vocab_size, w.d_model)
        self.pos_embed = nn.Embedding(w.max_context, w.d_model) if w.position == "learned" else None
        self.rotary = (Rotary(w.rotary_dim, w.rope_theta, max_positions, interleaved=w.family == "gptj")
                       if w.position == "rotary" else None)
        self.blocks = nn.ModuleList(Block(w) for _ in range(w.n_layers))
        self.norm = make_norm(w)
        self.lm_head = nn.Linear(w.d_model, w.vocab_size, bias=w.lm_head_bias)
        if w.tied_embeddings:
            self.lm_head.weight = self.embed.weight

    def _embed(self, tokens, positions):
        x = self.embed(tokens)
        if self.pos_embed is not None:  # learned positions wrap past the table (timing runs past max_context)
            x = x + self.pos_embed(positions % self.w.max_context)
        return x

    def prefill(self, tokens, caches):
        """tokens [B, P] -> logits of the last position [B, vocab]; fills the caches."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self._embed(tokens, positions)
        for block, cache in zip(self.blocks, caches):
            x = block(x, cache, positions, self.rotary)
        return self.lm_head(self.norm(x[:, -1:]))[:, 0]

    def decode(self, tokens, pos, caches):
        """One step: tokens [B] at position `pos` (int or 0-d long tensor) -> logits [B, vocab]."""
        positions = torch.as_tensor(pos, device=tokens.device).reshape(1)
        x = self._embed(tokens[:, None], positions)
        for block, cache in zip(self.blocks, caches):
            x = block(x, cache, positions, self.rotary, decode_pos=pos)
        return self.lm_head(self.norm(x))[:, 0]


def build(w: Workload, dtype=torch.bfloat16, device="cuda", seed=0) -> Decoder:
    """Random-initialised decoder on `device`: built on the meta device, then allocated and filled in place."""
    with torch.device("meta"):
        model = Decoder(w)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
        if model.rotary is not None:  # buffers made on meta must be recomputed
            fresh = Rotary(w.rotary_dim, w.rope_theta, model.rotary.cos.shape[0], model.rotary.interleaved)
            model.rotary.cos, model.rotary.sin = fresh.cos.to(device), fresh.sin.to(device)
        for block in model.blocks:
            if w.position == "alibi":
                block.attn.slopes = alibi_slopes(w.n_heads).to(device)
    return model.to(dtype).eval()
