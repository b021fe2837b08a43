"""Does transformers' compiled decode step replay one CUDA graph, or record new ones as it goes? Steps of a
compiled model (the workloads' shapes cut to a few layers, the static cache as measure.hf_campaign steps it),
each timed, with torch's counts of compiled graphs and of CUDA graphs recorded before and after the timed steps.

Run (repository root, on a GPU): python -m lab.hf_compiled_graphs --models mistral-7b,llama-3-8b --out graphs.csv
(--policy keyformer --kv-ratio 0.5: the compiled step with measure.hf.KeyformerCache)
"""
from __future__ import annotations

import argparse
import dataclasses

import pandas as pd
import torch

from kfsim.workload import get_workload
from measure import hf, timing
from measure.campaign import Point
from measure.hf_campaign import MAX_POSITIONS, HfRunner


def graphs_recorded() -> int | None:
    """CUDA graphs torch.compile's cudagraph trees have recorded on device 0 so far (None where torch hides it)."""
    try:
        from torch._inductor import cudagraph_trees
        return int(repr(cudagraph_trees.get_container(0).tree_manager.graph_counter)[len("count("):-1])
    except Exception:  # noqa: BLE001 - an internal of torch: absent is an answer too
        return None


def compiled_counts() -> dict:
    from torch._dynamo.utils import counters
    return {f"{group}.{k}": v for group in ("stats", "inductor") for k, v in counters[group].items()}


def run(name: str, batch: int, context: int, layers: int, steps: int, policy="full", kv_ratio=1.0) -> dict:
    w = dataclasses.replace(get_workload(name), n_layers=layers)
    model = hf.build_model(w, MAX_POSITIONS)
    if policy != "full":
        hf.enable_keyformer(model)
    runner = HfRunner.steps_only(mode="compiled")
    runner.compiled = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True, dynamic=True)
    with torch.inference_mode():
        step, _, rewind = runner.steady_step(model, w, Point(name, "decode", batch, context, kv_ratio, policy))
        for _ in range(5):
            step()
            rewind()
        before, counts_before = graphs_recorded(), compiled_counts()
        t = timing.time_steps(step, steps, 0, after=rewind)
        after, counts_after = graphs_recorded(), compiled_counts()
    grew = {k: v - counts_before.get(k, 0) for k, v in counts_after.items() if v != counts_before.get(k, 0)}
    del model, runner
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return {"model": name, "policy": policy, "kv_ratio": kv_ratio, "batch": batch, "context": context,
            "layers": layers, "median_ms": round(t.median_ms, 3),
            "p10_ms": round(t.p10_ms, 3), "p90_ms": round(t.p90_ms, 3), "graphs_before": before,
            "graphs_after": after, "counters_grew": ";".join(f"{k}+{v}" for k, v in grew.items()),
            "first_steps_ms": " ".join(f"{x:.2f}" for x in t.samples[:8])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mistral-7b,llama-3-8b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--policy", default="full", choices=["full", "keyformer", "h2o"])
    ap.add_argument("--kv-ratio", type=float, default=1.0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        rows.append(run(name, args.batch, args.context, args.layers, args.steps, args.policy, args.kv_ratio))
        pd.DataFrame(rows).to_csv(args.out, index=False)
        print(pd.DataFrame(rows).drop(columns=["first_steps_ms"]).to_string(index=False), flush=True)


if __name__ == "__main__":
    main()
