"""Operations an eager framework dispatches per decode step: the count behind its host cost.

An eager step is bound by the host when the host's time to dispatch every operation exceeds the GPU's work. The
count depends on how the library writes each model class (transformers' RMSNorm is eight tensor operations, its
LayerNorm one), not on the GPU, the batch or the weights: it is counted here on the CPU with tiny models of each
class, and `kfsim calibrate --host-ops` fits the host's time per operation against it.

    python -m measure.host_ops --out data/hf-host-ops/ops.csv     # transformers, every shipped workload it builds
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import sys

import pandas as pd
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kfsim.workload import Workload, get_workload

#: aten ops that launch no kernel (views and metadata)
NO_KERNEL = frozenset({
    "view", "_unsafe_view", "transpose", "permute", "unsqueeze", "squeeze", "expand", "slice", "select",
    "as_strided", "t", "split", "chunk", "unbind", "alias", "detach", "split_with_sizes",
    "_reshape_alias", "lift_fresh", "empty", "empty_strided", "size", "sym_size", "stride", "is_same_size",
    "narrow", "sym_numel", "sym_stride", "sym_storage_offset", "dim", "is_contiguous", "_local_scalar_dense"})
#: aten ops that return a view where they can and copy where they cannot (an expanded tensor reshaped, as
#: transformers' repeat_kv does): a kernel only when their result is not their input's memory
VIEW_OR_COPY = frozenset({"reshape", "contiguous", "flatten"})


def launches_kernel(name: str, args, out) -> bool:
    """Whether aten op `name`, called on `args`, returned `out` through a kernel (not a view or a no-op)."""
    if name in VIEW_OR_COPY:
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        return not (isinstance(out, torch.Tensor) and first is not None
                    and out.untyped_storage().data_ptr() == first.untyped_storage().data_ptr())
    return name not in NO_KERNEL

#: the transformers model classes kfsim measures, one workload each
MODELS = "llama-3-8b,mistral-7b,gpt-j-6b,mpt-7b,cerebras-gpt-6.7b"
COLUMNS = ("model", "family", "policy", "ops_per_layer", "ops_per_step", "dispatched_per_layer",
           "dispatched_per_step", "transformers", "torch")


class _Counter(TorchDispatchMode):
    """Counts the aten ops that reach a kernel while active (`ops`), and every aten op (`dispatched`)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.dispatched = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.dispatched += 1
        if launches_kernel(name, args, out):
            self.ops[name] += 1
        return out


def count(step, every: bool = False) -> int:
    """Kernel-launching aten ops of one call of `step()`; `every`: every aten op it dispatched, views and
    metadata included (each costs the host a dispatch, whether or not it reaches a kernel)."""
    return _both(step)[every]


def _both(step) -> tuple[int, int]:
    """(kernel-launching aten ops, every aten op dispatched) of one call of `step()`."""
    counter = _Counter()
    with counter:
        step()
    return sum(counter.ops.values()), counter.dispatched


def tiny(w: Workload, n_layers: int, real_heads: bool = False) -> Workload:
    """`w`'s architecture (class, norms, positions, grouped heads, window) at a width a CPU runs in milliseconds;
    `real_heads`: heads of the model's own size (what a cached token weighs against its scores)."""
    group = w.n_heads // w.n_kv_heads
    # at least two KV heads: a single one lets grouped heads' expansion (repeat_kv) reshape to a view, not a copy
    kv_heads = max(2, w.n_kv_heads // 8)
    heads = kv_heads * group
    head_dim = w.head_dim if real_heads else 16
    small = dict(n_layers=n_layers, n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim, d_model=heads * head_dim,
                 ffn_dim=4 * heads * head_dim, vocab_size=128)
    if w.rotary_dim:
        small["rotary_dim"] = (head_dim if w.rotary_dim >= w.head_dim else
                               w.rotary_dim if real_heads else head_dim // 2)
    if w.sliding_window:
        small["sliding_window"] = 32
    return dataclasses.replace(w, **small)


def per_step(model_name: str, policy: str, context: int = 64, batch: int = 2, every: bool = False
             ) -> tuple[float, float]:
    """(ops per layer, ops outside the layers) of one eager transformers decode step of `model_name` under
    `policy` (full or keyformer at kv-ratio 0.5), from tiny models of 1 and 3 layers; `every`: every aten op
    dispatched (count)."""
    return both_counts(model_name, policy, context, batch)[every]


def both_counts(model_name: str, policy: str, context: int = 64, batch: int = 2
                ) -> tuple[tuple[float, float], tuple[float, float]]:
    """per_step's (per layer, outside the layers) for kernel-launching ops and for every op dispatched, from the
    same steps."""
    from . import hf
    from .campaign import Point
    from .hf_campaign import HfRunner

    runner = HfRunner.steps_only()
    counts = {}
    for layers in (1, 3):
        w = tiny(get_workload(model_name), layers)
        model = hf.build_model(w, context + 64, device="cpu")
        if policy != "full":
            hf.enable_keyformer(model)
        pt = Point(model_name, "decode", batch, context, 1.0 if policy == "full" else 0.5, policy)
        with torch.inference_mode():
            step, _, rewind = runner.steady_step(model, w, pt, device="cpu")
            step()  # first call: lazy initialisation
            rewind()
            counts[layers] = _both(step)
            rewind()

    def split(i):
        per_layer = (counts[3][i] - counts[1][i]) / 2
        return per_layer, counts[1][i] - per_layer

    return split(0), split(1)


def write_counts(argv, doc: str, columns: tuple, rows_of) -> None:
    """The command line of every per-model count on a CPU (this module's, measure.kv_passes's,
    measure.prefill_counts's): --models and --out; each model's rows (`rows_of(name)`, dicts) with the transformers
    and torch versions that were counted, into a CSV of `columns`."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    import transformers

    rows = [{**row, "transformers": transformers.__version__, "torch": torch.__version__}
            for name in args.models.split(",") for row in rows_of(name)]
    pd.DataFrame(rows, columns=columns).to_csv(args.out, index=False)


def _rows(name: str):
    from . import hf

    family = get_workload(name).family
    for policy in ("full", "keyformer"):
        if policy != "full" and family not in hf.KEYFORMER_FAMILIES:
            continue
        (layer, step), (every_layer, every_step) = both_counts(name, policy)
        print(f"{name:20s} {policy:9s} {layer:6.1f} kernel ops per layer, {step:5.1f} per step; dispatched "
              f"{every_layer:6.1f} and {every_step:5.1f}", file=sys.stderr)
        yield {"model": name, "family": family, "policy": policy, "ops_per_layer": layer, "ops_per_step": step,
               "dispatched_per_layer": every_layer, "dispatched_per_step": every_step}


def main(argv=None) -> None:
    write_counts(argv, __doc__, COLUMNS, _rows)


if __name__ == "__main__":
    main()
