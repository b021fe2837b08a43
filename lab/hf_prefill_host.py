"""Where a short eager prefill's time goes, full cache against measure.hf.KeyformerCache: the wall time of one
prefill, the host's time in each aten op and CUDA runtime call (syncs and copies named), and the GPU's kernel time.

On the H100 (data/h100-sxm-hf-prefill) Keyformer's prefill of 128-512 tokens took 65-78 ms where its counted
operations (82 a layer for Llama-3-8B, 7 more than its decode step, which took 37 ms) price about 50: this says
whether the host waits (a sync), dispatches slow operations, or the GPU works longer.

Run (repository root, on a GPU):  python -m lab.hf_prefill_host --model llama-3-8b --prompt 128 --out prefill.csv
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile

from kfsim.workload import get_workload
from measure import hf
from measure.campaign import Point
from measure.hf_campaign import MAX_POSITIONS, HfRunner


def prefill_table(name: str, prompt: int, batch: int, layers: int, device: str = "cuda", repeats: int = 10
                  ) -> tuple[pd.DataFrame, dict]:
    """Per policy: the median wall ms of a prefill of `layers` of the model, and the profiler's rows of one (host
    and GPU us per event)."""
    w = dataclasses.replace(get_workload(name), n_layers=layers)
    model = hf.build_model(w, MAX_POSITIONS, device=device)
    hf.enable_keyformer(model)
    runner = HfRunner.steps_only()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    rows, wall = [], {}
    for policy, ratio in (("full", 1.0), ("keyformer", 0.5)):
        step, _ = runner.prefill_step(model, w, Point(name, "prefill", batch, prompt, ratio, policy), device)
        with torch.inference_mode():
            for _ in range(3):
                step()
            sync()
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                step()
                sync()
                times.append(1e3 * (time.perf_counter() - t))
            wall[policy] = sorted(times)[repeats // 2]
            with profile(activities=activities) as prof:
                step()
                sync()
        for e in prof.key_averages():
            rows.append({"model": name, "prompt": prompt, "batch": batch, "policy": policy, "event": e.key,
                         "calls": e.count, "host_self_us": e.self_cpu_time_total,
                         "gpu_self_us": getattr(e, "self_device_time_total", 0.0)})
    return pd.DataFrame(rows), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=8, help="layers of the model kept (its ops repeat per layer)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    df, wall = prefill_table(args.model, args.prompt, args.batch, args.layers, args.device)
    df.to_csv(args.out, index=False)
    for policy, g in df.groupby("policy"):
        g = g.sort_values("host_self_us", ascending=False)
        print(f"{args.model} ({args.layers} layers) {args.batch} x {args.prompt} {policy}: wall {wall[policy]:.1f} ms, host self "
              f"{g['host_self_us'].sum() / 1e3:.1f} ms, GPU {g['gpu_self_us'].sum() / 1e3:.1f} ms")
        for r in g.head(12).itertuples():
            print(f"  {r.event[:60]:60s} {r.calls:6d} calls {r.host_self_us / 1e3:7.2f} ms host "
                  f"{r.gpu_self_us / 1e3:7.2f} ms GPU")


if __name__ == "__main__":
    main()
