"""Figures docs/measuring.md quotes from the committed plain-decoder campaigns (data/<gpu>-plain/): decode bandwidth
against the measured HBM read ceiling, and the measured Keyformer speedup over the full cache.
Run: python -m measure.summarize [data]"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from kfsim import measurements
from kfsim.fmt import markdown_table
from kfsim.workload import get_workload


def decode_bytes(model: str, batch, cached) -> float:
    """Bytes a bf16 decode step must read at least: every streamed weight once, plus the KV of the cached tokens."""
    w = get_workload(model)
    return w.streamed_params * 2 + batch * cached * w.kv_bytes_per_token()


def read_ceiling_gbps(micro) -> float:
    """The HBM read ceiling (GB/s) of a `kfsim microbench` CSV: its hbm_read row."""
    return float(pd.read_csv(micro).query("bench == 'hbm_read'")["gbps"].iloc[0])


def plain_campaigns(data: Path) -> list[Path]:
    """The plain decoder's campaign folders under `data` (one per GPU, each with rows.csv and microbench.csv)."""
    return sorted(p for p in data.glob("*-plain") if (p / "microbench.csv").exists())


def bandwidth_table(data: Path) -> pd.DataFrame:
    """Batch-1 full-cache decode: (weights streamed + KV read) / step time, against the hbm_read microbenchmark."""
    rows = []
    for campaign in plain_campaigns(data):
        gpu = campaign.name.removesuffix("-plain")
        ceiling = read_ceiling_gbps(campaign / "microbench.csv")
        df = measurements.load([campaign / "rows.csv"], "torch-graph", "decode")
        for r in df[(df.policy == "full") & (df.batch == 1)].itertuples():
            moved = decode_bytes(r.model, 1, r.context)
            gbps = moved / (r.step_ms / 1e3) / 1e9
            rows.append({"gpu": gpu, "model": r.model, "context": r.context, "step_ms": r.step_ms,
                         "achieved_GBps": round(gbps), "read_ceiling_GBps": ceiling,
                         "fraction_of_ceiling": round(gbps / ceiling, 3)})
    return pd.DataFrame(rows)


def speedup_table(data: Path) -> pd.DataFrame:
    """Keyformer step time over the full cache's at the same GPU, model, batch and context."""
    rows = []
    for campaign in plain_campaigns(data):
        df = measurements.load([campaign / "rows.csv"], "torch-graph", "decode")
        full = df[df.policy == "full"].set_index(["model", "batch", "context"])["step_ms"]
        for r in df[df.policy == "keyformer"].itertuples():
            key = (r.model, r.batch, r.context)
            if key in full.index:
                rows.append({"gpu": r.gpu, "model": r.model, "batch": r.batch, "context": r.context,
                             "kv_ratio": r.kv_ratio, "full_ms": full[key], "keyformer_ms": r.step_ms,
                             "speedup": round(full[key] / r.step_ms, 3)})
    return pd.DataFrame(rows)


def main(data: str = "data") -> None:
    data = Path(data)
    print("## Batch-1 decode bandwidth (full cache, CUDA graphs)\n")
    print(markdown_table(bandwidth_table(data)))
    sp = speedup_table(data)
    print("\n## Keyformer speedup over the full cache (plain PyTorch scorer, CUDA graphs)\n")
    print(markdown_table(sp))
    print("\n## Largest measured point per GPU, model and kv-ratio (batch x context)\n")
    sp["tokens"] = sp.batch * sp.context
    top = sp.sort_values("tokens").groupby(["gpu", "model", "kv_ratio"]).tail(1).drop(columns="tokens")
    print(markdown_table(top.sort_values(["gpu", "model", "kv_ratio"])))


if __name__ == "__main__":
    main(*sys.argv[1:])
