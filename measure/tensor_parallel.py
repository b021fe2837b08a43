"""The plain decoder split over `tp` processes, Megatron-style, as kfsim.parallel models it.

Each rank holds 1/tp of the query heads (with their KV heads, replicated where tp exceeds them), of the FFN columns
and of the vocabulary: column-parallel QKV and FFN-in, row-parallel attention output and FFN-out each followed by
one all-reduce of the activations (ALLREDUCES_PER_LAYER), and a vocabulary-parallel LM head whose logits are
gathered. Row-parallel biases are added on rank 0 only, so the all-reduce adds them once.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from kfsim.parallel import shard

from .decoder import Decoder, alibi_slopes


def _ranges(w, rank: int, tp: int) -> dict:
    """Row ranges of the full model's weights that rank `rank` holds: q, k, v (in the fused QKV) and FFN."""
    s = shard(w, tp)
    q0 = rank * s.n_heads * w.head_dim
    kv_head = rank * w.n_kv_heads // tp  # a KV head shared by several ranks where tp > n_kv_heads
    k0 = w.q_dim + kv_head * w.head_dim
    v0 = w.q_dim + w.kv_dim + kv_head * w.head_dim
    f0 = rank * s.ffn_dim
    return {"q": (q0, q0 + s.q_dim), "k": (k0, k0 + s.kv_dim), "v": (v0, v0 + s.kv_dim), "ffn": (f0, f0 + s.ffn_dim),
            "heads": (rank * s.n_heads, (rank + 1) * s.n_heads), "vocab": (rank * s.vocab_size,
                                                                        min(w.vocab_size, (rank + 1) * s.vocab_size))}


def _rows(t: torch.Tensor | None, *spans) -> torch.Tensor | None:
    return None if t is None else torch.cat([t[a:b] for a, b in spans])


def _all_reduce_output(module, inputs, output):
    dist.all_reduce(output)
    return output


def shard_decoder(full: Decoder, rank: int, tp: int) -> Decoder:
    """Rank `rank`'s part of `full` (same device and dtype), its row-parallel layers all-reducing in the default
    process group."""
    w = full.w
    s, r = shard(w, tp), _ranges(w, rank, tp)
    p = next(full.parameters())
    with torch.device("meta"):
        part = Decoder(s)
    part = part.to_empty(device=p.device).to(p.dtype)
    swiglu = w.ffn_type == "swiglu"
    with torch.no_grad():
        part.embed = full.embed  # the embedding is replicated (a lookup: no bandwidth to share)
        if part.pos_embed is not None:
            part.pos_embed.weight.copy_(full.pos_embed.weight)
        if part.rotary is not None:
            part.rotary.cos, part.rotary.sin = full.rotary.cos, full.rotary.sin
        for fb, pb in zip(full.blocks, part.blocks):
            fa, pa = fb.attn, pb.attn
            pa.qkv.weight.copy_(_rows(fa.qkv.weight, r["q"], r["k"], r["v"]))
            if fa.qkv.bias is not None:
                pa.qkv.bias.copy_(_rows(fa.qkv.bias, r["q"], r["k"], r["v"]))
            pa.out.weight.copy_(fa.out.weight[:, r["q"][0]:r["q"][1]])
            fm, pm = fb.mlp, pb.mlp
            spans = [r["ffn"], tuple(x + w.ffn_dim for x in r["ffn"])] if swiglu else [r["ffn"]]
            pm.up.weight.copy_(_rows(fm.up.weight, *spans))
            if fm.up.bias is not None:
                pm.up.bias.copy_(_rows(fm.up.bias, *spans))
            pm.down.weight.copy_(fm.down.weight[:, r["ffn"][0]:r["ffn"][1]])
            for src, dst in ((fa.out, pa.out), (fm.down, pm.down)):
                if src.bias is not None:
                    dst.bias.copy_(src.bias if rank == 0 else torch.zeros_like(src.bias))
            for a, b in ((fb.norm1, pb.norm1), (fb.norm2, pb.norm2)):
                if a is not None:
                    b.load_state_dict(a.state_dict())
        part.norm.load_state_dict(full.norm.state_dict())
        shard_hooks(part, w, rank, tp)
        v0, v1 = r["vocab"]
        part.lm_head.weight.zero_()
        part.lm_head.weight[: v1 - v0].copy_(full.lm_head.weight[v0:v1])
        if full.lm_head.bias is not None:
            part.lm_head.bias.zero_()
            part.lm_head.bias[: v1 - v0].copy_(full.lm_head.bias[v0:v1])
    return part.eval()


def shard_hooks(part: Decoder, w, rank: int, tp: int) -> None:
    """Make `part` (a Decoder of shard(w, tp)) rank `rank`'s: its row-parallel layers (attention output, FFN down)
    all-reduce their outputs, and an ALiBi model's heads take their slopes among the whole model's."""
    slopes = rank_slopes(w, rank, tp)
    for block in part.blocks:
        block.attn.out.register_forward_hook(_all_reduce_output)
        block.mlp.down.register_forward_hook(_all_reduce_output)
        if slopes is not None:
            block.attn.slopes = slopes.to(block.attn.out.weight.device)


def gather_logits(local: torch.Tensor, vocab_size: int, tp: int) -> torch.Tensor:
    """Every rank's slice of the vocabulary's logits [B, vocab/tp] -> the whole [B, vocab] on every rank."""
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts, dim=-1)[..., :vocab_size]


def rank_slopes(w, rank: int, tp: int) -> torch.Tensor | None:
    """The ALiBi slopes of rank `rank`'s heads, for its full caches (None for other positions)."""
    if w.position != "alibi":
        return None
    a, b = _ranges(w, rank, tp)["heads"]
    return alibi_slopes(w.n_heads)[a:b]
