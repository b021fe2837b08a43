"""One decode step's attention over a full cache with ALiBi, in the ways the plain decoder could compute it, next to
the same attention without a bias (what a rotary model pays). MPT-7B's shape: 32 heads of 128.

Also a prompt's causal attention (batch 1): position columns in flash attention, or bias rows in chunks of queries.

Usage: python -m lab.bench_alibi [--out FILE.csv]   (CUDA graphs, medians of 50 replays)
"""
from __future__ import annotations

import argparse
import contextlib
import math

import pandas as pd
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from measure import timing
from measure.env import environment
from measure.decoder import alibi_slopes
from measure.kv_policies import ALIBI_COLUMNS, alibi_key_columns, alibi_query_columns

HEADS, HEAD_DIM = 32, 128


def variants(B: int, n: int):
    """name -> a callable computing one layer's decode attention over `n` cached tokens (plus the new one); the
    first, the float mask in torch's default SDPA, is the reference the others are compared with."""
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(B, HEADS, 1, HEAD_DIM, device=dev, dtype=dt)
    k = torch.randn(B, HEADS, n + 1, HEAD_DIM, device=dev, dtype=dt)
    v = torch.randn_like(k)
    slopes = alibi_slopes(HEADS).to(dev)
    key_pos = torch.arange(n + 1, device=dev)
    aligned = -(-(n + 1) // 8) * 8
    bias_buf = torch.zeros(HEADS, 1, aligned, device=dev, dtype=dt)
    scale = 1.0 / math.sqrt(HEAD_DIM)

    def bias():  # what the decoder builds every layer: slope_h x (key position - query position)
        return (slopes[:, None, None] * (key_pos - n).float()[None, None, :]).to(dt)

    def sdpa_bias():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias())

    def sdpa_bias_aligned():
        b = bias_buf[..., : n + 1]
        b.copy_(bias())
        return F.scaled_dot_product_attention(q, k, v, attn_mask=b)

    def matmul():
        logits = torch.matmul(q, k.transpose(-1, -2)).float() * scale
        logits += slopes[:, None, None] * (key_pos - n).float()
        return torch.matmul(logits.softmax(-1).to(dt), v)

    def no_bias():
        return F.scaled_dot_product_attention(q, k, v)

    # key positions in ALIBI_COLUMNS extra columns (head 136), no mask: the plain decoder's decode before bias rows
    qc = torch.cat([q, alibi_query_columns(slopes, HEAD_DIM, dt)[None, :, None, :].expand(B, HEADS, 1, -1)], -1)
    kc = torch.cat([k, alibi_key_columns(key_pos, dt)[None, None].expand(B, HEADS, -1, -1)], -1)
    vc = F.pad(v, (0, ALIBI_COLUMNS))

    def columns(backend=None):
        def fn():
            with contextlib.nullcontext() if backend is None else sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qc, kc, vc, scale=scale)[..., :HEAD_DIM]
        return fn

    def bias_backend(backend):  # with cuDNN: the plain decoder's decode (measure/kv_policies.py FullCache)
        b = bias_buf[..., : n + 1]

        def fn():
            b.copy_(bias())
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=b.expand(B, -1, -1, -1))
        return fn

    def columns_split(splits: int):
        """Flash-decoding by hand: the keys in `splits` chunks as extra heads, each chunk's log-sum-exp, merged.
        Padding keys carry position -256^3, a bias that no softmax weight survives."""
        S = n + 1
        chunk = -(-S // splits)
        pad = chunk * splits - S
        kp, vp = F.pad(kc, (0, 0, 0, pad)), F.pad(vc, (0, 0, 0, pad))
        kp[:, :, S:, HEAD_DIM] = -256
        ks = kp.reshape(B, HEADS * splits, chunk, -1)
        vs = vp.reshape(B, HEADS * splits, chunk, -1)

        def fn():
            qs = qc.repeat_interleave(splits, dim=1)
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qs, ks, vs, scale=scale)[:2]
            out = out.reshape(B, HEADS, splits, -1).float()
            w = torch.softmax(lse.reshape(B, HEADS, splits), dim=-1)
            return (out * w[..., None]).sum(2, keepdim=True).to(dt)[..., :HEAD_DIM]
        return fn

    return {"sdpa_bias": sdpa_bias, "sdpa_bias_aligned": sdpa_bias_aligned, "matmul": matmul, "no_bias": no_bias,
            "columns": columns(), "columns_flash": columns(SDPBackend.FLASH_ATTENTION),
            "columns_efficient": columns(SDPBackend.EFFICIENT_ATTENTION),
            "columns_cudnn": columns(SDPBackend.CUDNN_ATTENTION),
            "bias_cudnn": bias_backend(SDPBackend.CUDNN_ATTENTION),
            "columns_split8": columns_split(8)}


def prompt_variants(T: int, chunk: int = 1024):
    """name -> a callable computing one layer's causal attention over a prompt of T tokens with ALiBi (batch 1),
    each including what the decoder would build per layer (position columns, bias rows)."""
    dev, dt = "cuda", torch.bfloat16
    q, k, v = (torch.randn(1, HEADS, T, HEAD_DIM, device=dev, dtype=dt) for _ in range(3))
    slopes = alibi_slopes(HEADS).to(dev)
    pos = torch.arange(T, device=dev)
    scale = 1.0 / math.sqrt(HEAD_DIM)
    qcol = alibi_query_columns(slopes, HEAD_DIM, dt)[None, :, None, :].expand(1, HEADS, T, -1)
    kcol = alibi_key_columns(pos, dt)[None, None].expand(1, HEADS, -1, -1)

    def columns(backend=None):
        def fn():
            qc, kc, vc = torch.cat([q, qcol], -1), torch.cat([k, kcol], -1), F.pad(v, (0, ALIBI_COLUMNS))
            with contextlib.nullcontext() if backend is None else sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale)[..., :HEAD_DIM]
        return fn

    bias_buf = torch.empty(HEADS, chunk, T, device=dev, dtype=dt)

    def bias_chunks(backend):
        """Queries in chunks; each chunk's bias slope x (key - query), -inf above the diagonal."""
        def fn():
            outs = []
            for s in range(0, T, chunk):
                rel = (pos[None, :] - pos[s:s + chunk, None]).float()
                b = bias_buf[:, : rel.shape[0]]
                b.copy_(torch.where(rel <= 0, slopes[:, None, None] * rel, float("-inf")))
                with sdpa_kernel(backend):
                    outs.append(F.scaled_dot_product_attention(q[:, :, s:s + chunk], k, v, attn_mask=b[None]))
            return torch.cat(outs, 2)
        return fn

    def no_bias():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return {"prompt_bias_cudnn": bias_chunks(SDPBackend.CUDNN_ATTENTION),
            "prompt_bias_efficient": bias_chunks(SDPBackend.EFFICIENT_ATTENTION),
            "prompt_columns": columns(), "prompt_columns_flash": columns(SDPBackend.FLASH_ATTENTION),
            "prompt_columns_efficient": columns(SDPBackend.EFFICIENT_ATTENTION),
            "prompt_columns_cudnn": columns(SDPBackend.CUDNN_ATTENTION), "prompt_no_bias": no_bias}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    with torch.inference_mode():
        shapes = [(B, n, variants) for B in (1, 4, 16) for n in (4096, 16384)]
        shapes += [(1, T, lambda B, n: prompt_variants(n)) for T in (2048, 8192)]
        for B, n, make in shapes:
            ref = None
            for name, fn in make(B, n).items():
                try:
                    out = fn()
                    g = timing.capture_graph(fn)
                    t = timing.time_steps(g.replay, steps=50, warmup=5)
                except Exception as exc:  # a backend that refuses this shape
                    print(f"{name} B={B} n={n}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    continue
                ref = out if ref is None else ref
                rows.append({"batch": B, "context": n, "variant": name, "us": round(t.median_ms * 1e3, 2),
                             "max_abs_diff_vs_first": round(float((out - ref).abs().max()), 4)})
                print(rows[-1], flush=True)
    if args.out:
        pd.DataFrame(rows).assign(**environment()).to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
