"""Where a decode step's time goes on the GPU: every kernel of one steady-state step, timed by the CUDA profiler,
grouped by kind, next to the step's CUDA-event time (the difference is the gaps between kernels).

Also times each of the model's weight GEMMs alone at the step's batch (rotating copies so none is served from L2),
which says how far the GEMMs themselves are from the HBM read ceiling.

Run (repository root, on a GPU), one process for several points (each model is built and compiled once):
  python -m lab.profile_step --engine compiled --out prof.csv \
      --point gpt-j-6b,1,1024,keyformer,0.5 --point gpt-j-6b,1,512,full,1
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from kfsim.workload import get_workload

from measure import timing
from measure.campaign import Point, Runner

#: Kernel kinds by a piece of the kernel's name (first match wins); names are those cuBLAS, Triton and torch give.
KINDS = (("attention", ("_split_kernel", "_combine_kernel", "_finish_kernel", "flash", "fmha", "attention",
                        "softmax")),
         ("gemm", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "sm90", "splitk", "reduce_kernel")),
         ("fused elementwise (triton)", ("triton_",)),
         ("copy / index", ("copy", "index", "gather", "scatter", "fill", "cat")))


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def kernel_times(step, steps: int = 10) -> list[dict]:
    """Per kernel name: microseconds and launches per step, over `steps` profiled steps."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    total: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0:
            total.setdefault(e.name, []).append(e.device_time)
    rows = [{"kernel": name[:90], "kind": kind_of(name), "us_per_step": sum(t) / steps, "launches_per_step":
             len(t) / steps, "us_median": statistics.median(t)} for name, t in total.items()]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def weight_shapes(w) -> dict[str, tuple[int, int]]:
    """name -> (N, K) of each distinct weight of a layer of workload `w`, and the LM head."""
    up = (2 if w.ffn_type == "swiglu" else 1) * w.ffn_dim
    return {"qkv": (w.q_dim + 2 * w.kv_dim, w.d_model), "out": (w.d_model, w.q_dim), "up": (up, w.d_model),
            "down": (w.d_model, w.ffn_dim), "lm_head": (w.vocab_size, w.d_model)}


def gemm_rates(w, batch: int, steps: int = 20) -> list[dict]:
    """Each distinct weight of a layer, and the LM head, alone as F.linear at `batch` rows: GB/s of weight read."""
    rows = []
    for name, (n, k) in weight_shapes(w).items():
        copies = max(2, -(-256 * 2**20 // (n * k * 2)))  # >= 256 MB in flight: far past the 50 MB L2
        ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") for _ in range(copies)]
        x = torch.randn(batch, k, dtype=torch.bfloat16, device="cuda")

        def run():
            for wi in ws:
                F.linear(x, wi)

        g = timing.capture_graph(run)
        t = timing.time_steps(g.replay, steps, 3)
        us = t.median_ms * 1e3 / copies
        rows.append({"kernel": f"F.linear {name} [{batch}x{k}] x [{k}x{n}]", "kind": "gemm alone",
                     "us_per_step": us, "gbps": n * k * 2 / (us * 1e-6) / 1e9})
        del ws
    torch.cuda.empty_cache()
    return rows


def profile_point(runner: Runner, pt: Point, out: str | None, gemms: bool = True) -> None:
    """Time, profile and print one point; append its kernel table to `out`."""
    w = get_workload(pt.model)
    with torch.inference_mode():
        model = runner.model_for(pt.model)
        step, _ = runner.decode_step(model, w, pt)
        t = timing.time_steps(step, 50, 10)
        kernels = kernel_times(step)
        del step
        torch.cuda.empty_cache()
        alone = gemm_rates(w, pt.batch) if gemms else []
    label = (f"{pt.model} B={pt.batch} C={pt.context} {pt.policy} r={pt.kv_ratio:g} {runner.engine}"
             f"on {runner.env['gpu']}")
    busy = sum(r["us_per_step"] for r in kernels)
    launches = sum(r["launches_per_step"] for r in kernels)
    print(f"\n{label}: step {t.median_ms * 1e3:.0f} us (CUDA events, median of {t.n}); kernels {busy:.0f} us in "
          f"{launches:.0f} launches; gaps {t.median_ms * 1e3 - busy:.0f} us")
    by_kind: dict[str, list[float]] = {}
    for r in kernels:
        by_kind.setdefault(r["kind"], [0.0, 0.0])
        by_kind[r["kind"]][0] += r["us_per_step"]
        by_kind[r["kind"]][1] += r["launches_per_step"]
    for kind, (us, n) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        print(f"  {kind:28s} {us:8.0f} us {n:6.0f} launches  {us / max(n, 1):6.1f} us each")
    print("  top kernels:")
    for r in kernels[:12]:
        print(f"    {r['us_per_step']:8.1f} us x{r['launches_per_step']:<4.0f} {r['kernel']}")
    for r in alone:
        print(f"    alone: {r['us_per_step']:7.1f} us {r['gbps']:6.0f} GB/s  {r['kernel']}")
    if out:
        cols = ("point", "kernel", "kind", "us_per_step", "launches_per_step", "us_median", "gbps")
        with open(out, "a", newline="") as f:
            table = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            if f.tell() == 0:
                table.writeheader()
            for r in [{"kernel": "step (CUDA events)", "kind": "step", "us_per_step": t.median_ms * 1e3}, *kernels,
                      *alone]:
                table.writerow({"point": label, **{k: (round(v, 2) if isinstance(v, float) else v)
                                                   for k, v in r.items()}})


def parse_point(text: str) -> Point:
    """MODEL,BATCH,CONTEXT,POLICY,KV_RATIO -> a decode Point."""
    try:
        model, batch, context, policy, ratio = text.split(",")
        return Point(model, "decode", int(batch), int(context), float(ratio), policy)
    except ValueError:
        raise argparse.ArgumentTypeError(f"point {text!r}: expected MODEL,BATCH,CONTEXT,POLICY,KV_RATIO") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--point", type=parse_point, action="append", required=True,
                    help="MODEL,BATCH,CONTEXT,POLICY,KV_RATIO (repeat for several)")
    ap.add_argument("--engine", default="compiled", choices=("torch-graph", "torch-eager", "compiled"))
    ap.add_argument("--no-gemms", action="store_true", help="skip timing each weight GEMM alone")
    ap.add_argument("--out", help="CSV of the kernel tables (appended; a column names the point)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("Error: profile_step needs a CUDA GPU", file=sys.stderr)
        return 2
    runner = Runner(engine=a.engine)
    seen = set()
    for pt in a.point:
        profile_point(runner, pt, a.out, gemms=not a.no_gemms and (pt.model, pt.batch) not in seen)
        seen.add((pt.model, pt.batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
