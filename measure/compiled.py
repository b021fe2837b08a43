"""The `compiled` engine: the decoder's small ops fused by torch.compile, attention by the split-K Triton kernels.

Each layer's work outside attention is two functions of plain tensors (norm + QKV + rotary before attention;
output projection + residual + norm + MLP after it), compiled once per shape and reused by every layer, so the
32 layers cost one compilation rather than 32. The whole step is then replayed from a CUDA graph (campaign.py),
as pytorch-labs' gpt-fast does, leaving GEMMs, a few fused elementwise kernels and the attention kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .decoder import Decoder
from .kv_policies import EvictingCache, FullCache

torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)


def fuse_caches(caches: list, split_tokens: int | None = None, alibi: bool = False) -> list:
    """Wrap full and Keyformer caches so that their attention runs in the fused kernels (others, and ALiBi
    models, whose bias the kernels do not add, stay plain)."""
    if alibi:
        return list(caches)
    from .fused_attention import FusedFullCache, FusedKeyformerCache, StepState  # needs triton

    out = []
    state = StepState(caches[0].k.device) if caches else None
    for i, c in enumerate(caches):
        if isinstance(c, FullCache):
            out.append(FusedFullCache(c, split_tokens))
        elif isinstance(c, EvictingCache) and c.kind == "keyformer":
            out.append(FusedKeyformerCache(c, split_tokens, state, first=i == 0, last=i == len(caches) - 1))
        else:
            out.append(c)
    return out


def _norm(x, w, b, rms: bool):
    if rms:
        return F.rms_norm(x, (x.shape[-1],), w, 1e-5)
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def _rotate(x, cos, sin, dim: int, interleaved: bool):
    rot, rest = x[..., :dim], x[..., dim:]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        rot = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    else:
        a, b = rot.chunk(2, dim=-1)
        rot = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return torch.cat((rot, rest), dim=-1)


class CompiledDecoder:
    """decode(tokens, pos, caches) like Decoder.decode, with the per-layer glue compiled."""

    def __init__(self, model: Decoder, compile: bool = True):
        w = model.w
        self.model, self.w = model, w
        rms = w.norm == "rmsnorm"
        rotary = model.rotary
        dims = (w.q_dim, w.kv_dim, w.kv_dim)
        B_heads = (w.n_heads, w.n_kv_heads, w.head_dim)

        def pre(x, nw, nb, wqkv, bqkv, cos, sin):
            h = _norm(x, nw, nb, rms)
            q, k, v = F.linear(h, wqkv, bqkv).split(dims, dim=-1)
            B = x.shape[0]
            q = q.view(B, 1, B_heads[0], B_heads[2]).transpose(1, 2)
            k = k.view(B, 1, B_heads[1], B_heads[2]).transpose(1, 2)
            v = v.view(B, 1, B_heads[1], B_heads[2]).transpose(1, 2)
            if rotary is not None:
                q = _rotate(q, cos, sin, rotary.dim, rotary.interleaved)
                k = _rotate(k, cos, sin, rotary.dim, rotary.interleaved)
            return h, q.contiguous(), k.contiguous(), v.contiguous()

        swiglu = w.ffn_type == "swiglu"

        def mlp(h, wu, bu, wd, bd):
            u = F.linear(h, wu, bu)
            if swiglu:
                g, u = u.chunk(2, dim=-1)
                u = F.silu(g) * u
            else:
                u = F.gelu(u, approximate="tanh")
            return F.linear(u, wd, bd)

        parallel = w.parallel_residual

        def post(x, h, y, wo, bo, n2w, n2b, wu, bu, wd, bd):
            B = x.shape[0]
            a = F.linear(y.transpose(1, 2).reshape(B, 1, -1), wo, bo)
            if parallel:
                return x + a + mlp(h, wu, bu, wd, bd)
            x = x + a
            return x + mlp(_norm(x, n2w, n2b, rms), wu, bu, wd, bd)

        def head(x, nw, nb, wl, bl):
            return F.linear(_norm(x, nw, nb, rms), wl, bl)[:, 0]

        fns = (pre, post, head)
        self.pre, self.post, self.head = (torch.compile(f, dynamic=False) for f in fns) if compile else fns

    def decode(self, tokens, pos, caches):
        m, w = self.model, self.w
        positions = torch.as_tensor(pos, device=tokens.device).reshape(1)
        x = m._embed(tokens[:, None], positions)
        cos = sin = None
        if m.rotary is not None:
            cos, sin = m.rotary.cos[positions].to(x.dtype), m.rotary.sin[positions].to(x.dtype)
        for block, cache in zip(m.blocks, caches):
            a = block.attn
            h, q, k, v = self.pre(x, block.norm1.weight, getattr(block.norm1, "bias", None), a.qkv.weight,
                                  a.qkv.bias, cos, sin)
            y = cache.decode(q, k, v, pos, a.bias_fn if w.position == "alibi" else None)
            n2 = block.norm2
            x = self.post(x, h, y, a.out.weight, a.out.bias, None if n2 is None else n2.weight,
                          None if n2 is None else getattr(n2, "bias", None), block.mlp.up.weight, block.mlp.up.bias,
                          block.mlp.down.weight, block.mlp.down.bias)
        return self.head(x, m.norm.weight, getattr(m.norm, "bias", None), m.lm_head.weight, m.lm_head.bias)
