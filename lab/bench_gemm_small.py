"""The weight products of GPT-J-6B and Llama-3-8B at batch 16 and 64: cuBLAS (F.linear) against
measure.gemm_small, as weight GB/s (and the fraction of the HBM read ceiling).

--plain: each distinct weight alone as a bare product, per configuration (how _config's blocks were chosen), and
cuBLAS on the transposed product, W @ x^T (cublas_t: the result a transposed view; cublas_t_copy: made contiguous),
where its kernel choice sees the weight rows as the long side;
default: the fused products as the compiled decoder runs them (stacked matrices, folded norm, bias, activation,
residual; lab.bench_gemv's list), gemm_small's own configuration and a few others.
Each timing replays a CUDA graph over copies of the weights (at least 400 MB in all, 8x the L2), so every product
reads its weights from HBM. Run on a GPU (repository root):
  python -m lab.bench_gemm_small --out gemm-small.csv [--plain] [--batch 16,64] [--ceiling-gbps 4400]
"""
from __future__ import annotations

import argparse
import csv
import itertools
import re
import sys

import torch
import torch.nn.functional as F

from kfsim.workload import get_workload

from measure import timing
from measure.env import environment
from measure.nvml import Nvml
from .profile_step import weight_shapes

IN_FLIGHT_BYTES = 400e6
CONFIGS = tuple(itertools.product((16, 32, 64), (64, 128, 256), (4,), (3, 5)))  # block_n, block_k, warps, stages


def _time(step, copies: int, steps=20) -> float:
    """Microseconds per product: `step` runs `copies` products (one per weight copy), replayed from a graph."""
    g = timing.capture_graph(step)
    return timing.time_steps(g.replay, steps, 3).median_ms * 1e3 / copies


#: the fused products' configurations besides gemm_small's own: (block_n, block_k, stages)
FUSED_CONFIGS = ((32, 128, 3), (64, 128, 3))


def fused_rows(model: str, batch: int, ceiling: float, match: str = "") -> list[dict]:
    """Each fused product of the decoder's layer at `batch` rows: cuBLAS (F.linear per matrix, no glue) and
    gemm_small (glue included; the variants whose name `match` finds, as a regular expression), microseconds and
    weight GB/s; a variant whose output differs from gemm_small's own configuration's is reported, not timed (when
    that configuration itself fails, as a product of its own, the others go unchecked)."""
    from triton.runtime.errors import OutOfResources

    from .bench_gemv import products
    from measure.gemm_small import small_gemm

    out = []
    for p in products(model):
        nbytes = sum(a * b for a, b in p["shapes"]) * 2
        copies = max(2, -(-int(IN_FLIGHT_BYTES) // nbytes))
        sets = [_fused_args(p, batch) for _ in range(copies)]
        variants = [("cublas", None), ("auto", {})]
        variants += [(f"{bn}x{bk}x{st}", {"block_n": bn, "block_k": bk, "num_stages": st})
                     for bn, bk, st in FUSED_CONFIGS]
        variants = [v for v in variants if v[0] in ("cublas", "auto") or re.search(match, v[0])]
        try:  # the reference output: gemm_small's own configuration (checked against PyTorch by tests/test_gemv)
            want = small_gemm(sets[0][0], sets[0][1], **sets[0][2]).float()
        except (ValueError, RuntimeError, OutOfResources):  # reported below as that variant's failure
            want = None
        for name, kw in variants:
            if kw is None:
                fn = lambda x, w, k: [F.linear(x, w), F.linear(k.get("x2", x), k["w2"]) if "w2" in k else None]  # noqa: E731
            else:
                fn = lambda x, w, k, kw=kw: small_gemm(x, w, **k, **kw)  # noqa: E731
            try:
                if kw and want is not None and not torch.allclose(got := fn(*sets[0]).float(), want, atol=5e-2,
                                                                  rtol=5e-2):
                    print(f"  {model} {p['name']} B={batch} {name}: WRONG (max err {(got - want).abs().max():.3g})")
                    continue
                us = _time(lambda fn=fn: [fn(x, w, k) for x, w, k in sets], copies)
            except (ValueError, RuntimeError, OutOfResources) as exc:  # blocks that do not divide, or do not fit
                print(f"  {model} {p['name']} B={batch} {name}: {type(exc).__name__}: {str(exc)[:80]}")
                continue
            gbps = nbytes / (us * 1e-6) / 1e9
            out.append({"model": model, "product": p["name"], "batch": batch, "kernel": name, "us": round(us, 2),
                        "gbps": round(gbps, 1), "fraction": round(gbps / ceiling, 3) if ceiling else ""})
        del sets
        torch.cuda.empty_cache()
        rows = [r for r in out if r["product"] == p["name"]]
        print(f"{model:11s} {p['name']:9s} B={batch:<3d} {nbytes / 1e6:5.0f} MB | "
              + "  ".join(f"{r['kernel']} {r['us']:.1f}" for r in rows), flush=True)
    return out


def _fused_args(p: dict, batch: int) -> tuple:
    """(x, first matrix, keyword tensors) of one fused product at `batch` rows, fresh."""
    bf = {"dtype": torch.bfloat16, "device": "cuda"}
    ws = [torch.randn(*s, **bf) * s[1] ** -0.5 for s in p["shapes"]]
    kw = dict(p["kw"])
    if "bias" in kw:
        kw["bias"] = torch.randn(kw["bias"], **bf)
    if "residual" in kw:
        kw["residual"] = torch.randn(batch, kw["residual"], **bf)
    if kw.get("norm") == "layernorm":
        kw["row_sums"] = torch.cat([w.sum(1, dtype=torch.float32) for w in ws])
    if len(ws) > 1:
        kw["w2"] = ws[1]
        if kw.get("stack") == "cols":
            kw["x2"] = torch.randn(batch, ws[1].shape[1], **bf)
    return torch.randn(batch, ws[0].shape[1], **bf), ws[0], kw


def _regex(text: str) -> str:
    """An argparse type: a regular expression Python's re accepts."""
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular expression: {exc}") from None
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", default="16,64")
    ap.add_argument("--models", default="gpt-j-6b,llama-3-8b")
    ap.add_argument("--ceiling-gbps", type=float, default=0.0)
    ap.add_argument("--plain", action="store_true", help="bare products per weight and configuration")
    ap.add_argument("--match", default="", metavar="REGEX", type=_regex,
                    help="only the gemm_small variants whose name this finds (and cuBLAS's, and auto); --plain: "
                         "the configurations BLOCK_NxBLOCK_KxWARPSxSTAGES")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("Error: bench_gemm_small needs a CUDA GPU", file=sys.stderr)
        return 2
    import datetime as dt

    import triton

    from measure.gemm_small import small_gemm

    nvml = Nvml()
    env = {**environment(nvml), "triton": triton.__version__, "date": dt.date.today().isoformat()}
    if not a.plain:
        rows = []
        with torch.inference_mode():
            for model in a.models.split(","):
                for batch in (int(b) for b in a.batch.split(",")):
                    new = fused_rows(model, batch, a.ceiling_gbps, a.match)
                    sm = nvml.state().get("sm_mhz")  # right after the timings, at load clocks
                    rows += [{**r, "sm_mhz": sm} for r in new]
        import pandas as pd

        pd.DataFrame(rows).assign(**env).to_csv(a.out, index=False)
        return 0
    cols = ("model", "product", "batch", "kernel", "us", "gbps", "fraction", "gpu", "driver", "torch", "triton",
            "sm_mhz", "date")
    with open(a.out, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        out.writeheader()
        for model in a.models.split(","):
            for name, (n, k) in weight_shapes(get_workload(model)).items():
                copies = max(2, -(-int(IN_FLIGHT_BYTES) // (n * k * 2)))
                ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * k ** -0.5 for _ in range(copies)]
                for batch in (int(b) for b in a.batch.split(",")):
                    x = torch.randn(batch, k, dtype=torch.bfloat16, device="cuda")
                    ref = F.linear(x, ws[0])
                    results = [("cublas", _time(lambda: [F.linear(x, w) for w in ws], copies))]
                    for kernel, fn in (("cublas_t", lambda w: (w @ x.t()).t()),
                                       ("cublas_t_copy", lambda w: (w @ x.t()).t().contiguous())):
                        if not torch.allclose(fn(ws[0]).float(), ref.float(), atol=5e-2, rtol=5e-2):
                            print(f"  {model} {name} B={batch} {kernel}: WRONG")
                            continue
                        results.append((kernel, _time(lambda fn=fn: [fn(w) for w in ws], copies)))
                    cublas = len(results)
                    for bn, bk, warps, stages in CONFIGS:
                        if n % bn or k % bk or not re.search(a.match, f"{bn}x{bk}x{warps}x{stages}"):
                            continue
                        kw = dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
                        try:
                            got = small_gemm(x, ws[0], **kw)
                        except Exception as exc:  # a configuration Triton cannot compile (shared memory)
                            print(f"  {model} {name} B={batch} {bn}x{bk}x{warps}x{stages}: {type(exc).__name__}")
                            continue
                        if not torch.allclose(got.float(), ref.float(), atol=5e-2, rtol=5e-2):
                            print(f"  {model} {name} B={batch} {bn}x{bk}: WRONG (max err "
                                  f"{(got.float() - ref.float()).abs().max().item():.3g})")
                            continue
                        results.append((f"{bn}x{bk}x{warps}x{stages}",
                                        _time(lambda kw=kw: [small_gemm(x, w, **kw) for w in ws], copies)))
                    best = min(results[1:], key=lambda r: r[1], default=None)
                    sm_mhz = nvml.state().get("sm_mhz")  # right after the timings, at load clocks
                    for kernel, us in results:
                        gbps = n * k * 2 / (us * 1e-6) / 1e9
                        out.writerow({"model": model, "product": name, "batch": batch, "kernel": kernel,
                                      "us": round(us, 2), "gbps": round(gbps, 1),
                                      "fraction": round(gbps / a.ceiling_gbps, 3) if a.ceiling_gbps else "",
                                      "gpu": env["gpu"], "driver": env.get("driver"), "torch": env.get("torch"),
                                      "triton": env.get("triton"), "sm_mhz": sm_mhz,
                                      "date": env.get("date")})
                    cub = results[0][1]
                    if cublas > 1:
                        print(f"{model:11s} {name:8s} B={batch:<3d} [{n}x{k}] cublas {cub:7.1f} us | "
                              + "  ".join(f"{kn} {us:.1f}" for kn, us in results[1:cublas]), flush=True)
                    if best:
                        print(f"{model:11s} {name:8s} B={batch:<3d} [{n}x{k}] cublas {cub:7.1f} us "
                              f"{n * k * 2 / cub / 1e3:6.0f} GB/s | best {best[0]:12s} {best[1]:7.1f} us "
                              f"{n * k * 2 / best[1] / 1e3:6.0f} GB/s  ({cub / best[1]:.2f}x)", flush=True)
                del ws
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
