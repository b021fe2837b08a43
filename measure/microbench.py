"""Microbenchmarks that calibration leans on: HBM read and copy bandwidth, GEMM rates, launch cost, decode attention,
KV appends.

Buffers are far larger than L2 (50-60 MB on Hopper) so bandwidth figures are HBM figures. Rows go to a CSV with
columns bench, batch, heads, context, bytes, flops, median_ms, gbps, tflops plus the environment columns.
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch
import torch.nn.functional as F

from . import timing
from .env import environment

COLUMNS = ("bench", "batch", "heads", "context", "head_dim", "bytes", "flops", "median_ms", "p10_ms", "p90_ms",
           "gbps", "tflops", "us_per_kernel", "gpu", "gpu_name", "driver", "cuda", "torch", "tp")


def _row(bench, t: timing.Timing, bytes_=0.0, flops=0.0, **kw) -> dict:
    s = t.median_ms / 1e3
    return {"bench": bench, "bytes": bytes_, "flops": flops, "median_ms": round(t.median_ms, 5),
            "p10_ms": round(t.p10_ms, 5), "p90_ms": round(t.p90_ms, 5),
            "gbps": round(bytes_ / s / 1e9, 1) if bytes_ else "", "tflops": round(flops / s / 1e12, 2) if flops else "",
            **kw}


def hbm(gib: float = 4.0, steps: int = 30) -> list[dict]:
    n = int(gib * (1 << 30) // 2)
    x = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    read = timing.time_steps(lambda: x.sum(dtype=torch.float32), steps, 3)
    copy = timing.time_steps(lambda: y.copy_(x), steps, 3)
    rows = [_row("hbm_read", read, bytes_=x.numel() * 2), _row("hbm_copy", copy, bytes_=2 * x.numel() * 2)]
    return rows


def gemm(steps: int = 20) -> list[dict]:
    rows = []
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    t = timing.time_steps(lambda: a @ b, steps, 3)
    rows.append(_row("gemm_8192", t, flops=2 * 8192**3, batch=8192))
    # skinny GEMM: a decode step's [batch, 8192] x [8192, 28672] weight (470 MB, far above L2)
    w = torch.randn(28672, 8192, dtype=torch.bfloat16, device="cuda")
    for batch in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512):
        x = torch.randn(batch, 8192, dtype=torch.bfloat16, device="cuda")
        t = timing.time_steps(lambda: F.linear(x, w), steps, 3)
        rows.append(_row("skinny_gemm", t, bytes_=w.numel() * 2, flops=2 * batch * w.numel(), batch=batch))
    return rows


def launch(kernels: int = 1000) -> list[dict]:
    """Fixed cost per kernel: many 1-element adds, eager (CPU launch bound) and replayed from a CUDA graph."""
    x = torch.zeros(1, device="cuda")

    def many():
        for _ in range(kernels):
            x.add_(1)

    eager = timing.time_steps(many, 5, 2)
    g = timing.capture_graph(many)
    graph = timing.time_steps(g.replay, 10, 2)
    return [_row("launch_eager", eager, us_per_kernel=round(eager.median_ms * 1e3 / kernels, 3), batch=kernels),
            _row("launch_graph", graph, us_per_kernel=round(graph.median_ms * 1e3 / kernels, 3), batch=kernels)]


def attention(steps: int = 30) -> list[dict]:
    """Decode attention (one query per sequence) through SDPA against batch x heads x context."""
    rows = []
    D = 128
    for batch, heads in ((1, 8), (1, 32), (8, 32), (32, 32), (64, 32)):
        for context in (1024, 4096, 16384):
            kv_bytes = 2 * batch * heads * context * D * 2
            if kv_bytes > 30e9:
                continue
            q = torch.randn(batch, heads, 1, D, dtype=torch.bfloat16, device="cuda")
            k = torch.randn(batch, heads, context, D, dtype=torch.bfloat16, device="cuda")
            v = torch.randn_like(k)
            t = timing.time_steps(lambda: F.scaled_dot_product_attention(q, k, v), steps, 3)
            rows.append(_row("sdpa_decode", t, bytes_=kv_bytes, flops=4 * batch * heads * context * D, batch=batch,
                             heads=heads, context=context, head_dim=D))
    return rows


def cat(steps: int = 30) -> list[dict]:
    """A dynamic KV cache's append: one token concatenated to a [batch, heads, tokens, 128] cache, with every input
    contiguous (`cat_contiguous`: PyTorch's vectorised batched copy), the cache a strided view (`cat_strided`, as
    transformers keeps a sliding window's last tokens) or the new token one (`cat_strided_token`, as MPT's fused
    QKV projection leaves it at batch > 1): both of these take the generic per-element copy. Bytes: the cache
    read and the result written."""
    rows = []
    D, heads = 128, 32
    for batch, context in ((1, 16384), (16, 4096), (64, 1024)):
        whole = torch.randn(batch, heads, context + 1, D, dtype=torch.bfloat16, device="cuda")
        new = torch.randn(batch, heads, 1, D, dtype=torch.bfloat16, device="cuda")
        qkv = torch.randn(batch, 1, 3 * heads * D, dtype=torch.bfloat16, device="cuda")
        token = qkv[..., :heads * D].reshape(batch, 1, heads, D).transpose(1, 2)
        moved = 2 * whole[:, :, 1:].numel() * 2
        contiguous = whole[:, :, 1:].contiguous()
        for bench, cache, last in (("cat_contiguous", contiguous, new), ("cat_strided", whole[:, :, 1:], new),
                                   ("cat_strided_token", contiguous, token)):
            t = timing.time_steps(lambda: torch.cat([cache, last], dim=-2), steps, 3)
            rows.append(_row(bench, t, bytes_=moved, batch=batch, heads=heads, context=context, head_dim=D))
        del whole, new, qkv, token, contiguous, cache, last
    return rows


def run_all(out: str | Path, echo=print) -> list[dict]:
    env = environment()
    rows = []
    for name, fn in (("hbm", hbm), ("gemm", gemm), ("launch", launch), ("attention", attention),
                     ("cat", cat)):
        echo(f"microbenchmark {name} ...")
        for r in fn():
            rows.append({**{k: env.get(k) for k in ("gpu", "gpu_name", "driver", "cuda", "torch")}, **r})
        torch.cuda.empty_cache()
    write_rows(out, rows)
    return rows


def write_rows(out: str | Path, rows: list[dict]) -> None:
    """The microbenchmark CSV: COLUMNS, a row per benchmark point (blank where a column does not apply)."""
    with Path(out).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k, "") for k in COLUMNS})
