"""Which operation of a transformers eager decode step is slow: per aten op, its GPU time (profiler) next to the
bytes it touches (a dispatch-mode count of its inputs and outputs), so an op that moves the cache slowly shows as
a low achieved bandwidth, and one that moves it often as many bytes.

Models are the workloads' real shapes cut to a few layers (an eager step's ops repeat per layer); the full cache
at batch x context, built and stepped as measure.hf_campaign does.

Run (repository root, on a GPU):
  python -m lab.hf_op_bandwidth --point mpt-7b,16,4096 --point mistral-7b,16,8192 --out ops.csv
"""
from __future__ import annotations

import argparse
import collections
import dataclasses

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kfsim.workload import get_workload
from measure import hf, host_ops
from measure.campaign import Point
from measure.hf_campaign import MAX_POSITIONS, HfRunner


STEP = "kfsim:step"


class _OpBytes(TorchDispatchMode):
    """Bytes in and out of each kernel-launching aten op, by op name."""

    def __init__(self):
        super().__init__()
        self.bytes = collections.Counter()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if host_ops.launches_kernel(name, args, out):
            self.calls[name] += 1
            self.bytes[name] += sum(t.numel() * t.element_size() for t in tree_leaves((args, kwargs, out))
                                    if isinstance(t, torch.Tensor))
        return out


def op_table(name: str, batch: int, context: int, layers: int, steps: int = 5) -> pd.DataFrame:
    """Per aten op of one step at (batch, context): calls, GPU us, MB touched, achieved GB/s; and its top kernel."""
    w = dataclasses.replace(get_workload(name), n_layers=layers)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = hf.build_model(w, MAX_POSITIONS, device=device)
    runner = HfRunner.steps_only()
    with torch.inference_mode():
        step, _, rewind = runner.steady_step(model, w, Point(name, "decode", batch, context, 1.0, "full"), device)
        for _ in range(3):
            step()
            rewind()
        meter = _OpBytes()
        with meter:
            step()
        rewind()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                with torch.profiler.record_function(STEP):
                    step()
                rewind()  # outside the step's range: its kernels are not the step's
            if device == "cuda":
                torch.cuda.synchronize()
    gpu_us, kernels = collections.Counter(), collections.defaultdict(collections.Counter)
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CPU or not e.kernels:
            continue
        top = e  # the outermost aten op: the one the dispatch count saw (the ops inside it ran under it)
        while top.cpu_parent is not None and top.cpu_parent.name.startswith("aten::"):
            top = top.cpu_parent
        outer = top.cpu_parent
        while outer is not None and outer.name != STEP:
            outer = outer.cpu_parent
        if outer is None:
            continue
        op = top.name.removeprefix("aten::")
        for k in e.kernels:
            gpu_us[op] += k.duration / steps
            kernels[op][k.name[:60]] += k.duration / steps
    rows = []
    for op in sorted(set(gpu_us) | set(meter.bytes), key=lambda o: -gpu_us.get(o, 0)):
        us, mb = gpu_us.get(op, 0.0), meter.bytes.get(op, 0) / 1e6
        top = kernels[op].most_common(1)[0][0] if kernels[op] else ""
        rows.append({"model": name, "batch": batch, "context": context, "layers": layers, "op": op,
                     "calls": meter.calls.get(op, 0), "gpu_us": round(us, 1), "mb": round(mb, 2),
                     "gb_s": round(mb / us * 1e3, 1) if us else None, "top_kernel": top})
    del model
    torch.cuda.empty_cache()
    return pd.DataFrame(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--point", action="append", required=True, help="MODEL,BATCH,CONTEXT")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    tables = []
    for p in args.point:
        name, batch, context = p.split(",")
        t = op_table(name, int(batch), int(context), args.layers)
        tables.append(t)
        pd.concat(tables).to_csv(args.out, index=False)
        print(f"\n{name} batch {batch} context {context} ({args.layers} layers): "
              f"{t.gpu_us.sum() / 1e3:.2f} ms of kernels, {t.mb.sum() / 1e3:.2f} GB touched")
        print(t.head(8).drop(columns=["model", "batch", "context", "layers"]).to_string(index=False))


if __name__ == "__main__":
    main()
