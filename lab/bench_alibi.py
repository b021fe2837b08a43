"""One decode step's attention over a full cache with ALiBi, in the ways the plain decoder could compute it, next to
the same attention without a bias (what a rotary model pays). MPT-7B's shape: 32 heads of 128.

Usage: python -m lab.bench_alibi [--out FILE.csv]   (CUDA graphs, medians of 50 replays)
"""
from __future__ import annotations

import argparse
import csv
import math

import torch
import torch.nn.functional as F

from measure import timing
from measure.decoder import alibi_slopes

HEADS, HEAD_DIM = 32, 128


def variants(B: int, n: int):
    """name -> a callable computing one layer's decode attention over `n` cached tokens (plus the new one)."""
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

    return {"sdpa_bias": sdpa_bias, "sdpa_bias_aligned": sdpa_bias_aligned, "matmul": matmul, "no_bias": no_bias}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    with torch.inference_mode():
        for B in (1, 16):
            for n in (4096, 16384):
                ref = None
                for name, fn in variants(B, n).items():
                    out = fn()
                    ref = out if ref is None else ref
                    g = timing.capture_graph(fn)
                    t = timing.time_steps(g.replay, steps=50, warmup=5)
                    rows.append({"batch": B, "context": n, "variant": name, "us": round(t.median_ms * 1e3, 2),
                                 "max_abs_diff_vs_sdpa_bias": round(float((out - ref).abs().max()), 4)})
                    print(rows[-1], flush=True)
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
