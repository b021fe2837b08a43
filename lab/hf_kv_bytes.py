"""How many times transformers moves the cache it attends, counted and measured, per model class.

Counted: the bytes every kernel-launching operation of one eager decode step touches (inputs and outputs), on a
CPU with tiny models of each class (measure.host_ops.tiny, heads of the real size) at two contexts, and for a
sliding window at two full windows; the growth per attended KV byte.
Measured: from the largest full-cache steps of data/h100-sxm-hf-eager, the step less the weights' streaming (at
engines/hf-eager's weight bandwidth) over the attended KV bytes' time (at its KV bandwidth).

Usage: python -m lab.hf_kv_bytes
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kfsim.engine import get_engine
from kfsim.hardware import get_hardware
from kfsim.inputs import make_setup
from kfsim.ops import decode_ops
from kfsim.workload import get_workload
from measure import hf, host_ops
from measure.campaign import Point
from measure.hf_campaign import HfRunner

MODELS = ("llama-3-8b", "mistral-7b", "gpt-j-6b", "mpt-7b")
ROWS = Path(__file__).resolve().parent.parent / "data" / "h100-sxm-hf-eager" / "rows.csv"


class _Bytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ not in host_ops.NO_KERNEL:
            self.total += sum(t.numel() * t.element_size() for t in tree_leaves((args, kwargs, out))
                              if isinstance(t, torch.Tensor))
        return out


def _per_attended_byte(name: str, sizes, batch: int, point) -> float:
    """Growth of the bytes one step's operations touch per attended KV byte, between two `sizes` of tokens
    attended; `point(w, size)`: the tiny workload and the context to step at."""
    runner, touched = HfRunner.steps_only(), {}
    for size in sizes:
        w, context = point(host_ops.tiny(get_workload(name), 1, real_heads=True), size)
        model = hf.build_model(w, 4 * max(sizes), device="cpu")
        with torch.inference_mode():
            step, _, rewind = runner.steady_step(model, w, Point(name, "decode", batch, context, 1.0, "full"), "cpu")
            for _ in range(2):  # past the first append: a window keeps its strided view from then on
                step()
                rewind()
            meter = _Bytes()
            with meter:
                step()
        touched[size] = meter.total
    kv_token = 2 * w.n_kv_heads * w.head_dim * next(model.parameters()).element_size()
    return (touched[sizes[1]] - touched[sizes[0]]) / ((sizes[1] - sizes[0]) * batch * kv_token)


def counted(name: str, contexts=(512, 1024), batch=2) -> float:
    """Bytes the step's operations touch per attended KV byte, as the context grows (window kept out of reach)."""
    def point(w, context):
        far = dataclasses.replace(w, sliding_window=4 * max(contexts)) if w.sliding_window else w
        return far, context
    return _per_attended_byte(name, contexts, batch, point)


def counted_window(name: str, windows=(512, 1024), batch=2) -> float | None:
    """The same past a full sliding window (None for a model without one): the window attended, each step's append
    copied from the strided view transformers keeps of it."""
    if not get_workload(name).sliding_window:
        return None
    return _per_attended_byte(name, windows, batch,
                              lambda w, window: (dataclasses.replace(w, sliding_window=window), 2 * window))


def measured(name: str) -> float:
    """The largest full-cache step's KV traffic per attended byte on the H100 (engines/hf-eager's bandwidths)."""
    rows = pd.read_csv(ROWS)
    rows = rows[(rows.model == name) & (rows.policy == "full") & (rows.status == "ok")]
    row = rows.loc[rows.step_ms.idxmax()]
    engine, hw = get_engine("hf-eager"), get_hardware("h100-sxm")
    s = make_setup(gpu="h100-sxm", model=name, engine="hf-eager")
    cached = min(row.context, s.workload.sliding_window or row.context)
    ops = decode_ops(s.workload, s.policy, s.dtypes, row.batch, cached)
    bw = hw.bandwidth_bytes_per_s
    weights_s = sum(float(o.weight_bytes) for o in ops) / (bw * engine.weight_bandwidth_fraction)
    kv_s = sum(float(o.kv_read_bytes) for o in ops) / (bw * engine.kv_bandwidth_fraction)
    return (row.step_ms * 1e-3 - weights_s) / kv_s


def main() -> None:
    rows = []
    for m in MODELS:
        window = counted_window(m)
        rows.append({"model": m, "counted (CPU)": round(counted(m), 2),
                     "counted, window full": "" if window is None else round(window, 2),
                     "measured (H100)": round(measured(m), 1)})
    table = pd.DataFrame(rows)
    table["measured / counted"] = (table["measured (H100)"] / table["counted (CPU)"]).round(1)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
