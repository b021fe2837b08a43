"""How steady an eager transformers decode step is on this host: one point timed a few times over, with Python's
garbage collector on or off and the process free to run on every core or pinned to one. Eager steps are bound by
the host dispatching kernels, so the host's own jitter is the step's.

Usage: python -m lab.hf_jitter [--models gpt-j-6b,mistral-7b] [--repeats 3] [--out FILE.csv]
"""
from __future__ import annotations

import argparse
import gc
import os
import time

import pandas as pd
import torch

from kfsim.workload import get_workload
from measure import timing
from measure.env import environment
from measure.campaign import Point
from measure.hf_campaign import HfRunner

POINTS = [(1, 4096, "full", 1.0), (16, 1024, "keyformer", 0.5)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt-j-6b,mistral-7b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    every = os.sched_getaffinity(0)
    runner = HfRunner(mode="eager", steps=args.steps, warmup=10)
    rows = []
    for name in args.models.split(","):
        model, w = runner.model_for(name), get_workload(name)
        for batch, context, policy, ratio in POINTS:
            pt = Point(name, "decode", batch, context, ratio, policy)
            with torch.inference_mode():
                step, _, rewind = runner.steady_step(model, w, pt)
                for pinned in (False, True):
                    os.sched_setaffinity(0, {min(every)} if pinned else every)
                    for gc_off in (False, True):
                        for rep in range(args.repeats):
                            if gc_off:
                                gc.collect()
                                gc.disable()
                            probe = timing.host_launch_us(3000)
                            t = timing.time_steps(step, args.steps, 10, after=rewind)
                            probe_after = timing.host_launch_us(3000)
                            gc.enable()
                            rows.append({"model": name, "batch": batch, "context": context, "policy": policy,
                                         "kv_ratio": ratio, "pinned": pinned, "gc_off": gc_off, "repeat": rep,
                                         "time": round(time.time(), 2), "probe_us": round(probe, 3),
                                         "probe_after_us": round(probe_after, 3),
                                         "median_ms": round(t.median_ms, 3), "p10_ms": round(t.p10_ms, 3),
                                         "p90_ms": round(t.p90_ms, 3),
                                         "samples": " ".join(f"{x:.2f}" for x in t.samples)})
                            print({k: v for k, v in rows[-1].items() if k != "samples"}, flush=True)
            os.sched_setaffinity(0, every)
            torch.cuda.empty_cache()
    if args.out:
        pd.DataFrame(rows).assign(**environment()).to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
