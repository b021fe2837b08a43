"""The table the fused-decoder work is judged by, from a campaign with the compiled engine (issue: decode at the
bandwidth limit): per point the step time, (weights + KV) bandwidth against the measured HBM read ceiling,
Keyformer's step over the full-cache step at a context equal to its budget (the ideal reduced-cache step), and
Keyformer's speedup over the full cache against what kfsim's `ideal` engine predicts.

Run: python -m lab.fused_table MEAS.csv MICROBENCH.csv [--engine compiled]
"""
from __future__ import annotations

import math
import sys

import pandas as pd

from kfsim import measurements
from kfsim.fmt import markdown_table
from kfsim.inputs import make_setup
from kfsim.predict import predict
from measure.summarize import decode_bytes, read_ceiling_gbps


def table(meas: str, micro: str, engine: str = "compiled") -> pd.DataFrame:
    df = measurements.load([meas], engine, "decode")
    ceiling = read_ceiling_gbps(micro)
    full = df[df.policy == "full"].set_index(["model", "batch", "context"])["step_ms"]
    rows = []
    for r in df.itertuples():
        cached = r.context if r.policy == "full" else math.ceil(r.kv_ratio * r.context - 1e-9)
        moved = decode_bytes(r.model, r.batch, cached)
        row = {"gpu": r.gpu, "model": r.model, "batch": r.batch, "context": r.context, "policy": r.policy,
               "kv_ratio": r.kv_ratio, "step_ms": round(r.step_ms, 3),
               "bw_fraction_of_ceiling": round(moved / (r.step_ms / 1e3) / 1e9 / ceiling, 3)}
        if r.policy != "full":
            ideal_step = full.get((r.model, r.batch, cached))
            row["over_ideal_reduced_step"] = round(r.step_ms / ideal_step, 3) if ideal_step else None
            base = full.get((r.model, r.batch, r.context))
            if base:
                row["speedup"] = round(base / r.step_ms, 3)
                s = make_setup(gpu=r.gpu, model=r.model, engine="ideal", policy=r.policy, kv_ratio=r.kv_ratio)
                predicted = float(predict(s, r.batch, r.context)["speedup_vs_full"])
                row["ideal_predicted_speedup"] = round(predicted, 3)
                row["speedup_over_predicted"] = round(row["speedup"] / predicted, 3)
        rows.append(row)
    return pd.DataFrame(rows)


def summary(t: pd.DataFrame) -> dict:
    """The issue's goals from a table: batch-1 bandwidth fraction per model (min, max), Keyformer step over the ideal
    reduced-cache step (median, worst, worst per batch), measured speedup over the ideal engine's (median, worst)."""
    b1 = t[(t.policy == "full") & (t.batch == 1)]
    span = lambda f: [f.bw_fraction_of_ceiling.min(), f.bw_fraction_of_ceiling.max()]  # noqa: E731
    out = {"batch1_bw_fraction": span(b1), "batch1_bw_fraction_by_model": {m: span(g) for m, g in b1.groupby("model")}}
    out["batch1_points_at_0.85"] = [int((b1.bw_fraction_of_ceiling >= 0.85).sum()), len(b1)]
    kf = t[t.policy != "full"]
    if len(kf):
        over, ratio = kf.over_ideal_reduced_step.dropna(), kf.speedup_over_predicted.dropna()
        out["over_ideal_reduced_step"] = {"median": round(float(over.median()), 3), "worst": float(over.max()),
                                          "worst_by_batch": {int(b): float(g.over_ideal_reduced_step.max())
                                                             for b, g in kf.groupby("batch")}}
        out["speedup_over_predicted"] = {"median": round(float(ratio.median()), 3), "worst": float(ratio.min())}
    return out


def main(argv=None):
    argv = argv or sys.argv[1:]
    engine = "compiled"
    if "--engine" in argv:
        i = argv.index("--engine")
        engine = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    t = table(argv[0], argv[1], engine)
    print(markdown_table(t.astype(object).where(t.notna(), "")))
    s = summary(t)
    if s["batch1_points_at_0.85"][1]:
        lo, hi = s["batch1_bw_fraction"]
        print(f"\nbatch-1 full-cache bandwidth / read ceiling: min {lo:.3f}, max {hi:.3f}")
        for model, (lo, hi) in s["batch1_bw_fraction_by_model"].items():
            print(f"  {model}: {lo:.3f}-{hi:.3f}")
        print("  points at >= 0.85: {} of {}".format(*s["batch1_points_at_0.85"]))
    else:
        print("\nno batch-1 full-cache points (the batch-1 bandwidth goal needs them)")
    if "over_ideal_reduced_step" in s:
        o, r = s["over_ideal_reduced_step"], s["speedup_over_predicted"]
        print(f"Keyformer step / ideal reduced-cache step: max {o['worst']:.3f} (median {o['median']:.3f}; worst at "
              "batch " + ", ".join(f"{b}: {v:.3f}" for b, v in o["worst_by_batch"].items()) + ")")
        print(f"measured speedup / ideal-engine speedup: min {r['worst']:.3f} (median {r['median']:.3f})")


if __name__ == "__main__":
    main()
