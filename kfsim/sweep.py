"""Predict the cross product of GPUs, models, engines, policies, KV dtypes, batches and contexts in few numpy passes.

One `predict` call per (GPU, model, engine, policy, kv-ratio, KV dtype) prices the whole batch x context grid at
once, so a sweep of 100,000 points takes about a second.
"""
from __future__ import annotations

import itertools
import time
from typing import Callable

import numpy as np

from .inputs import make_setup
from .predict import predict

AXES = ("gpu", "model", "engine", "policy", "kv_ratio", "kv_dtype", "tp")


def combos(policies, kv_ratios):
    """(policy, kv_ratio) pairs that mean something: the full cache once at ratio 1, others below 1."""
    pairs = []
    for r in kv_ratios:
        if r >= 1:
            pairs.append(("full", 1.0))
        else:
            pairs += [(p, r) for p in policies if p != "full"]
    return list(dict.fromkeys(pairs))


def sweep(gpus, models, batches, seqs, kv_ratios=(1.0,), policies=("keyformer",), kv_dtypes=(None,),
          engines=("default",), window=0.3, on_progress: Callable[[int, int], None] | None = None, tps=(1,)):
    """All combinations as a pandas DataFrame, one row per point with the `predict --json` fields and `caveat`:
    whether an engine caveat covers the point (their notes in the frame's attrs["caveats"])."""
    import pandas as pd

    B, S = np.meshgrid(np.asarray(batches, dtype=np.int64), np.asarray(seqs, dtype=np.int64), indexing="ij")
    B, S = B.ravel(), S.ravel()
    settings = list(itertools.product(gpus, models, engines, combos(policies, kv_ratios), kv_dtypes, tps))
    frames, caveats = [], {}
    for i, (gpu, model, engine, (policy, ratio), kv_dtype, tp) in enumerate(settings):
        s = make_setup(gpu=gpu, model=model, engine=engine, policy=policy, kv_ratio=ratio, window=window,
                       kv_dtype=kv_dtype, tp=tp)
        out = predict(s, B, S)
        cols = {"gpu": s.hw.name, "model": s.workload.name, "engine": s.engine.name, "policy": s.policy.kind,
                "kv_ratio": ratio, "window": window if s.policy.evicts else np.nan, "kv_dtype": str(s.dtypes.kv),
                "batch": B, "seq": S, "caveat": bool(s.caveats)}
        cols.update({k: np.broadcast_to(v, B.shape) for k, v in out.items()})
        frames.append(pd.DataFrame(cols))
        caveats.update(dict.fromkeys(s.caveats))
        if on_progress:
            on_progress(i + 1, len(settings))
    df = pd.concat(frames, ignore_index=True)
    df.attrs["caveats"] = list(caveats)  # the engines' measured misses that cover some rows (their `caveat`)
    return df


def check_out(path: str) -> None:
    """Before any work: the file's extension names a format kfsim writes, and Parquet's library is there."""
    import importlib.util

    from .errors import KfsimError
    from .files import output_path

    if not str(path).endswith((".csv", ".parquet")):
        raise KfsimError(f"--out {path!r}: use a .csv or .parquet file name")
    if path.endswith(".parquet") and importlib.util.find_spec("pyarrow") is None:
        raise KfsimError("writing Parquet needs pyarrow: pip install -e '.[analysis]' (or use a .csv file)")
    output_path(path, "out")


def write(df, path: str) -> None:
    """CSV or Parquet by the file's extension, written whole or not at all."""
    from .files import write_atomic

    check_out(path)
    if path.endswith(".parquet"):
        write_atomic(path, lambda tmp: df.to_parquet(tmp, index=False))
    else:
        write_atomic(path, lambda tmp: df.to_csv(tmp, index=False))


class Progress:
    """A progress bar on stderr that appears only once a sweep has run for more than a second."""

    def __init__(self, echo_bar):
        self.start, self.bar, self.echo_bar = time.perf_counter(), None, echo_bar

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None and time.perf_counter() - self.start > 1.0 and done < total:
            self.bar = self.echo_bar(total)
            self.bar.update(done)
        elif self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.render_finish()
