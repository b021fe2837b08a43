"""The batch-1 products of one decoder layer: cuBLAS (F.linear, one per matrix, glue not counted) against the fused
Triton kernels of measure.gemv (glue included), per kernel configuration, as weight GB/s against the HBM read
ceiling. This is how the configuration `gemv` picks was chosen.

Each timing replays a CUDA graph over copies of the weights (at least 400 MB in all, 8x the L2), so every product
reads its weights from HBM, as in a real step. Run on a GPU (repository root):
  python -m lab.bench_gemv --out gemv.csv [--ceiling-gbps 3079]
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys

import pandas as pd
import torch
import torch.nn.functional as F

from kfsim.workload import get_workload

from measure import timing

IN_FLIGHT_BYTES = 400e6


def products(model: str) -> list[dict]:
    """The layer's products as the fast decoder runs them: name, matrices' shapes and gemv keyword arguments."""
    w = get_workload(model)
    d, qkv = w.d_model, w.q_dim + 2 * w.kv_dim
    norm = "rmsnorm" if w.norm == "rmsnorm" else "layernorm"
    if w.parallel_residual:  # GPT-J
        return [
            {"name": "qkv+up", "shapes": [(qkv, d), (w.ffn_dim, d)], "kw": {"stack": "rows", "norm": norm,
             "act": "gelu_tanh", "act_from": qkv, "bias": qkv + w.ffn_dim}},
            {"name": "out+down", "shapes": [(d, w.q_dim), (d, w.ffn_dim)], "kw": {"stack": "cols", "bias": d,
             "residual": d}},
            {"name": "lm_head", "shapes": [(w.vocab_size, d)], "kw": {"norm": norm}},
        ]
    return [
        {"name": "qkv", "shapes": [(qkv, d)], "kw": {"norm": norm}},
        {"name": "out", "shapes": [(d, w.q_dim)], "kw": {"residual": d}},
        {"name": "gate_up", "shapes": [(2 * w.ffn_dim, d)], "kw": {"stack": "glu", "norm": norm}},
        {"name": "down", "shapes": [(d, w.ffn_dim)], "kw": {"residual": d}},
        {"name": "lm_head", "shapes": [(w.vocab_size, d)], "kw": {"norm": norm}},
    ]


def _args(p: dict) -> tuple[list, dict]:
    """Fresh weights, input and keyword tensors of one product."""
    bf = dict(dtype=torch.bfloat16, device="cuda")
    ws = [torch.randn(*s, **bf) * s[1] ** -0.5 for s in p["shapes"]]
    kw = dict(p["kw"])
    x = torch.randn(ws[0].shape[1], **bf)
    if "bias" in kw:
        kw["bias"] = torch.randn(kw["bias"], **bf)
    if "residual" in kw:
        kw["residual"] = torch.randn(kw["residual"], **bf)
    if kw.get("norm") == "layernorm":  # folded norms (as the decoder runs them): the rows' sums for the mean
        kw["row_sums"] = torch.cat([w.sum(1, dtype=torch.float32) for w in ws])
    if len(ws) > 1:
        kw["w2"] = ws[1]
        if kw.get("stack") == "cols":
            kw["x2"] = torch.randn(ws[1].shape[1], **bf)
    return [x, ws[0]], kw


def time_product(p: dict, config, steps=20) -> dict:
    """Microseconds per product: cuBLAS (config None: each matrix's F.linear) or gemv with config
    (block_n, num_warps, num_stages, block_k); block_n and num_warps None: gemv's own choice ('auto'), block_k
    None: gemv's own."""
    from measure.gemv import gemv  # needs triton

    nbytes = sum(a * b for a, b in p["shapes"]) * 2
    copies = max(2, math.ceil(IN_FLIGHT_BYTES / nbytes))
    sets = [_args(p) for _ in range(copies)]
    if config is None:
        def step():
            for (x, w), kw in sets:
                F.linear(x, w)
                if "w2" in kw:
                    F.linear(kw.get("x2", x), kw["w2"])
    else:
        bn, warps, stages, bk = config

        def step():
            for (x, w), kw in sets:
                gemv(x, w, **kw, block_n=bn, num_warps=warps, num_stages=stages, block_k=bk)
    try:
        graph = timing.capture_graph(step)
    except ValueError:  # the block does not divide the rows
        return {}
    t = timing.time_steps(graph.replay, steps, 3)
    us = t.median_ms * 1e3 / copies
    del sets, graph
    torch.cuda.empty_cache()
    return {"us": round(us, 2), "gbps": round(nbytes / (us * 1e-6) / 1e9, 1), "mbytes": round(nbytes / 1e6, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="CSV to write")
    ap.add_argument("--models", default="gpt-j-6b,llama-3-8b")
    ap.add_argument("--ceiling-gbps", type=float, default=0.0, help="HBM read ceiling, for the fraction column")
    ap.add_argument("--block-n", default="4,8,16")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--stages", default="1")
    ap.add_argument("--block-k", default="", help="columns per load, e.g. 256,512,1024 (default: gemv's choice)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("Error: bench_gemv needs a CUDA GPU", file=sys.stderr)
        return 2
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    block_k = ints(a.block_k) if a.block_k else [None]
    configs = [None, (None, None, 1, None)] + list(itertools.product(ints(a.block_n), ints(a.warps),
                                                                       ints(a.stages), block_k))
    rows = []
    with torch.inference_mode():
        for model in a.models.split(","):
            for p in products(model):
                line = []
                for c in configs:
                    r = time_product(p, c)
                    if not r:
                        continue
                    name = "cublas" if c is None else "auto" if c[0] is None else "x".join(
                        str(v) for v in c if v is not None)
                    r = {"model": model, "product": p["name"], "kernel": name, **r}
                    if a.ceiling_gbps:
                        r["fraction"] = round(r["gbps"] / a.ceiling_gbps, 3)
                    rows.append(r)
                    line.append(f"{name} {r['us']:.1f}")
                best = min((r for r in rows if r["product"] == p["name"] and r["model"] == model
                            and r["kernel"] != "cublas"), key=lambda r: r["us"])
                cub = next(r for r in rows if r["product"] == p["name"] and r["model"] == model
                           and r["kernel"] == "cublas")
                print(f"{model:10s} {p['name']:9s} {cub['mbytes']:6.0f} MB cublas {cub['gbps']:5.0f} GB/s "
                      f"best {best['kernel']} {best['gbps']:5.0f} GB/s | us: {'  '.join(line)}", flush=True)
    from measure.env import environment

    pd.DataFrame(rows).assign(**environment()).to_csv(a.out, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
