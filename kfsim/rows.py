"""Measured rows grouped by configuration, with the engine-independent parts of their prediction precomputed.

Calibration evaluates thousands of candidate engines over the same rows; the ops (FLOPs and bytes) of each row do
not depend on the engine, so they are built once here and only priced per candidate.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .engine import Engine
from .errors import KfsimError
from .hardware import get_hardware
from .inputs import Setup
from .ops import Dtypes, attended_tokens, decode_ops, prefill_ops
from .parallel import shard
from .policy import DEFAULT_WINDOW, make_policy
from .predict import prefill_time, step_time
from .workload import get_workload

GROUP_KEYS = ["gpu", "model", "phase", "policy", "kv_ratio", "window", "tp"]


@dataclass
class Group:
    """Rows sharing GPU, model, phase and policy: batch and context vary along arrays."""

    setup: Setup
    phase: str
    batch: np.ndarray
    context: np.ndarray
    cached: np.ndarray
    measured_ms: np.ndarray
    index: np.ndarray  # row positions in the frame
    ops: list

    def predict_ms(self, engine: Engine) -> np.ndarray:
        s = dataclasses.replace(self.setup, engine=engine)
        if self.phase == "prefill":
            return prefill_time(s, self.batch, self.context, self.ops).seconds * 1e3
        return step_time(s, self.batch, self.cached, self.ops).seconds * 1e3


def group_rows(df, engine: Engine, where: str = "measurements") -> list[Group]:
    """Resolve each row's GPU and model (user errors name the file and the value) and build the groups."""
    df = df.copy()
    if "window" not in df.columns:
        df["window"] = DEFAULT_WINDOW
    df["window"] = df["window"].fillna(DEFAULT_WINDOW)
    df["tp"] = df["tp"].fillna(1).astype(int) if "tp" in df.columns else 1
    groups = []
    for key, g in df.groupby(GROUP_KEYS, sort=True):
        gpu, model, phase, policy, ratio, window, tp = key
        try:
            hw, w = get_hardware(str(gpu)), shard(get_workload(str(model)), int(tp))
        except KfsimError as exc:
            raise KfsimError(f"{where}: {exc}") from None
        kind = str(policy)
        pol = make_policy(None if kind == "full" and ratio >= 1 else kind, float(ratio), float(window))
        dtypes = Dtypes.of(w, _first(g, "dtype"), _first(g, "kv_dtype"))
        setup = Setup(hw, w, engine, pol, dtypes, tp=int(tp), host_launch_us=host_launch_of(g))
        batch = g["batch"].to_numpy(float)
        context = g["context"].to_numpy(float)
        if phase == "prefill":
            cached = context
            ops = prefill_ops(w, pol, dtypes, batch, context)
        else:
            cached = attended_tokens(w, pol, context.astype(np.int64)).astype(float)
            ops = decode_ops(w, pol, dtypes, batch, cached)
        measured = g["step_ms"].to_numpy(float) if "step_ms" in g else np.full(len(g), np.nan)
        groups.append(Group(setup, phase, batch, context, cached, measured, g.index.to_numpy(), ops))
    return groups


def host_launch_of(rows) -> float | None:
    """The host `rows` ran on: the median of their host_launch_us (one launch-cost sample per row can be an
    outlier; a group's rows are timed one after another on one host), None where none was recorded."""
    if "host_launch_us" not in rows:
        return None
    launch = rows["host_launch_us"].to_numpy(float)
    launch = launch[np.isfinite(launch) & (launch > 0)]
    return float(np.median(launch)) if launch.size else None


def _first(g, col):
    if col in g.columns and g[col].notna().any():
        return str(g[col].dropna().iloc[0])
    return None


def predict_frame(df, engine: Engine, where: str = "measurements") -> np.ndarray:
    """Predicted step_ms for every row of `df`, in row order."""
    out = np.empty(len(df))
    for grp in group_rows(df.reset_index(drop=True), engine, where):
        out[grp.index] = grp.predict_ms(engine)
    return out
