"""The table the fused-decoder work is judged by, from a campaign with the compiled engine (issue: decode at the
bandwidth limit): per point the step time, (weights + KV) bandwidth against the measured HBM read ceiling,
Keyformer's step over the full-cache step at a context equal to its budget (the ideal reduced-cache step), and
Keyformer's speedup over the full cache against what kfsim's `ideal` engine predicts.

Run: python -m measure.fused_table MEAS.csv MICROBENCH.csv [--engine compiled]
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


def main(argv=None):
    argv = argv or sys.argv[1:]
    engine = "compiled"
    if "--engine" in argv:
        i = argv.index("--engine")
        engine = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    t = table(argv[0], argv[1], engine)
    print(markdown_table(t.astype(object).where(t.notna(), "")))
    kf = t[t.policy != "full"]
    b1 = t[(t.policy == "full") & (t.batch == 1)]
    print(f"\nbatch-1 full-cache bandwidth / read ceiling: min {b1.bw_fraction_of_ceiling.min():.3f}, "
          f"max {b1.bw_fraction_of_ceiling.max():.3f}")
    if len(kf):
        print(f"Keyformer step / ideal reduced-cache step: max {kf.over_ideal_reduced_step.max():.3f}")
        print(f"measured speedup / ideal-engine speedup: min {kf.speedup_over_predicted.min():.3f}")


if __name__ == "__main__":
    main()
