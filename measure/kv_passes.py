"""How many times an eager transformers step moves the cache it attends, and how much of that is a strided copy.

A model class's code decides its KV traffic: the dynamic cache appends by concatenating (the cache read and
written again), grouped heads may be expanded to a copy per query head before attention (transformers' repeat_kv,
where a mask is built), GPT-J casts its keys to fp32, MPT multiplies by matmul. A concatenation whose inputs are
not all contiguous (MPT's new token at batch > 1, a view cut from its fused QKV output; a sliding window's cache,
a view of its last tokens) takes PyTorch's generic per-element copy, several times slower than the vectorised
one (`kfsim microbench`: cat_strided against cat_contiguous). None of this depends on the GPU or the weights: it
is counted here on the CPU, from the bytes every kernel-launching operation of one step reads and writes, with
tiny models of each class whose heads have the real size, at two cache sizes; the growth per attended KV byte is
a model's passes, split into `streamed` and `strided` (the concatenations with a strided input).

Paths: `full` (batch 2; `full_batch1` at batch 1, where a view of one sequence is contiguous) and, for a model
with a sliding window, `window` / `window_batch1` once the cache holds a full window; for a model whose class
measure.hf.KeyformerCache hooks, `keyformer` and `h2o`: that cache's step at kv-ratio 0.5, its growth per kept KV
byte, with the scorer's own bytes (its work under `kv_policies.scoring_range`) apart in `scorer`.

    python -m measure.kv_passes --out data/hf-kv-passes/passes.csv
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import unittest.mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kfsim.workload import get_workload

from . import host_ops

COLUMNS = ("model", "family", "path", "streamed", "strided", "scorer", "transformers", "torch")
#: an evicting cache's paths (measure.hf.KeyformerCache of that kind), counted at this kv-ratio
SCORED_PATHS, SCORED_RATIO = ("keyformer", "h2o"), 0.5
#: in-place writes into a few indexed slots of a tensor: they move what they write, not the whole tensor
INDEXED_WRITES = {"scatter_", "index_put_", "index_copy_", "index_fill_", "masked_scatter_"}
#: tokens (cache sizes, or windows) the growth is taken between
SIZES = (256, 512)


class ByteMeter(TorchDispatchMode):
    """Bytes every kernel-launching aten op reads and writes while active: streamed, strided (the concatenations
    with an input that is not contiguous) and scorer (an evicting cache's scoring, inside `scoring()`)."""

    def __init__(self):
        super().__init__()
        self.streamed = self.strided = self.scorer = 0
        self.scoring_depth = 0

    @contextlib.contextmanager
    def scoring(self):
        """Stands in for kv_policies.scoring_range: what runs inside is the scorer's."""
        self.scoring_depth += 1
        try:
            yield
        finally:
            self.scoring_depth -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if host_ops.launches_kernel(name, args, out):
            inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            if name in INDEXED_WRITES:  # the slots written (as many as the index names), the index and the source
                target, rest = inputs[0], inputs[1:]
                written = max((t.numel() for t in rest), default=0) * target.element_size()
                moved = written + sum(t.numel() * t.element_size() for t in rest)
            elif name.endswith("_like"):  # rand_like and kin take the input's shape, not its values
                moved = sum(t.numel() * t.element_size() for t in outputs)
            else:
                moved = sum(t.numel() * t.element_size() for t in inputs + outputs)
            if self.scoring_depth:
                self.scorer += moved
            elif name == "cat" and not all(t.is_contiguous() for t in inputs):
                self.strided += moved
            else:
                self.streamed += moved
        return out


def _step_bytes(name: str, batch: int, tokens: int, window: bool, policy: str = "full"
                ) -> tuple[tuple[int, int, int], int]:
    """((streamed, strided, scorer) bytes of one steady step, one attended token's KV bytes per sequence) of a
    tiny `name` at `tokens` attended: a cache of `tokens`, with `window` a window of `tokens` full twice over, or
    with an evicting `policy` a budget of `tokens` (kv-ratio SCORED_RATIO)."""
    from . import hf, kv_policies
    from .campaign import Point
    from .hf_campaign import HfRunner

    w = host_ops.tiny(get_workload(name), 1, real_heads=True)
    w = dataclasses.replace(w, sliding_window=tokens if window else (4 * tokens if w.sliding_window else None))
    ratio = 1.0 if policy == "full" else SCORED_RATIO
    context = 2 * tokens if window else round(tokens / ratio)
    model = hf.build_model(w, 2 * context, device="cpu")
    if policy != "full":
        hf.enable_keyformer(model)
    meter = ByteMeter()
    with torch.inference_mode(), unittest.mock.patch.object(kv_policies, "scoring_range", meter.scoring):
        step, _, rewind = HfRunner.steps_only().steady_step(model, w, Point(name, "decode", batch, context, ratio,
                                                                            policy), "cpu")
        for _ in range(2):  # past the first append: a window keeps its strided view from then on
            step()
            rewind()
        with meter:
            step()
    kv_token = 2 * w.n_kv_heads * w.head_dim * next(model.parameters()).element_size()
    return (meter.streamed, meter.strided, meter.scorer), kv_token


def passes(name: str, batch: int, window: bool = False, policy: str = "full") -> tuple[float, float, float]:
    """(streamed, strided, scorer) bytes moved per attended KV byte as the cache (the window, or an evicting
    policy's budget) grows."""
    (s0, d0, c0), kv_token = _step_bytes(name, batch, SIZES[0], window, policy)
    (s1, d1, c1), _ = _step_bytes(name, batch, SIZES[1], window, policy)
    attended = (SIZES[1] - SIZES[0]) * batch * kv_token
    return (s1 - s0) / attended, (d1 - d0) / attended, (c1 - c0) / attended


def paths(name: str) -> dict[str, tuple[float, float, float]]:
    """Every path of `name`: full and full_batch1; window and window_batch1 where it has a sliding window;
    keyformer and h2o where measure.hf.KeyformerCache hooks its class."""
    from . import hf

    w = get_workload(name)
    out = {"full": passes(name, 2), "full_batch1": passes(name, 1)}
    if w.sliding_window:
        out.update(window=passes(name, 2, window=True), window_batch1=passes(name, 1, window=True))
    if w.family in hf.KEYFORMER_FAMILIES:
        out.update({p: passes(name, 2, policy=p) for p in SCORED_PATHS})
    return out


def _rows(name: str):
    for path, (streamed, strided, scorer) in paths(name).items():
        print(f"{name:20s} {path:13s} {streamed:6.2f} streamed, {strided:5.2f} strided, {scorer:5.2f} scorer passes",
              file=sys.stderr)
        yield {"model": name, "family": get_workload(name).family, "path": path, "streamed": round(streamed, 3),
               "strided": round(strided, 3), "scorer": round(scorer, 3) if path in SCORED_PATHS else None}


def main(argv=None) -> None:
    host_ops.write_counts(argv, __doc__, COLUMNS, _rows)


if __name__ == "__main__":
    main()
