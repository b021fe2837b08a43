"""A decode step by operation group, predicted and measured: where the model is wrong, not just by how much.

The model's ops (kfsim.ops) fall into the groups `kfsim measure --profile` measures (measure/profile.py); a group's
predicted time is its ops' roofline time, fixed costs included, and `gaps` is the rest of the step (the fixed cost
per step and layer, the host's dispatch a GPU waits for, all-reduces).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .errors import KfsimError

#: operation groups, in the order tables show them
GROUPS = ("projections", "attention", "keyformer", "ffn", "norms", "positional", "lm_head", "other", "gaps")

#: kfsim.ops op name -> group (an op not named here is "other")
OP_GROUP = {"q_proj": "projections", "kv_proj": "projections", "o_proj": "projections", "attention": "attention",
            "keyformer_score": "keyformer", "h2o_score": "keyformer", "ffn_up": "ffn", "ffn_act": "ffn",
            "ffn_down": "ffn", "norm": "norms", "final_norm": "norms", "rotary": "positional", "lm_head": "lm_head"}

#: the columns that name a profiled point
POINT_KEYS = ["gpu", "model", "phase", "batch", "context", "kv_ratio", "policy"]

#: the profile file's columns (measure/profile.py writes them): the point, then one group's time per step
PROFILE_COLUMNS = ("gpu", "model", "phase", "engine", "batch", "context", "kv_ratio", "policy", "group", "ms",
                   "profiled_step_ms", "steps", "source")


def predicted_groups(step) -> dict[str, np.ndarray]:
    """Milliseconds per group of a StepTime (kfsim.roofline), its `per_op` mapped by OP_GROUP; `gaps` makes the
    groups add up to the step."""
    out = {g: 0.0 for g in GROUPS}
    for name, seconds in step.per_op.items():
        out[OP_GROUP.get(name, "other")] = out[OP_GROUP.get(name, "other")] + np.asarray(seconds) * 1e3
    out["gaps"] = np.asarray(step.seconds) * 1e3 - sum(out[g] for g in GROUPS if g != "gaps")
    return out


def group_times(g, engine) -> dict[str, np.ndarray]:
    """The model's milliseconds per operation group at each point of a decode group `g` (kfsim.rows.Group)."""
    from .predict import step_time

    pred = predicted_groups(step_time(dataclasses.replace(g.setup, engine=engine), g.batch, g.cached, g.ops))
    return {name: np.broadcast_to(np.asarray(ms, dtype=float), g.batch.shape) for name, ms in pred.items()}


def read_profile(path, measured_engine: str | None = None):
    """A profile CSV of `kfsim measure --profile`, checked: every column there, each point's columns as a
    measurement file's (kfsim.measurements.checked), known groups, times >= 0. A file that profiled several
    decoders (its `engine` column) gives the steps of `measured_engine`, which must then be one of them."""
    from .measurements import Rule, _checked, checked, read_csv

    what = "a profile CSV of kfsim measure --profile"
    df = read_csv(path, what)
    if missing := [c for c in PROFILE_COLUMNS if c not in df.columns]:
        raise KfsimError(f"{path}: not {what} (no column {missing[0]})")
    if bad := sorted(set(df["group"].astype(str)) - set(GROUPS)):
        raise KfsimError(f"{path}: group {bad[0]!r}; allowed: {', '.join(GROUPS)}")
    df = checked(df, path)
    df["ms"] = _checked(df["ms"], Rule(zero_ok=True), path)
    df["profiled_step_ms"] = _checked(df["profiled_step_ms"], Rule(), path)
    engines = sorted(df["engine"].astype(str).unique())
    if len(engines) > 1:
        if measured_engine not in engines:
            raise KfsimError(f"{path}: the profile holds steps of several decoders ({', '.join(engines)}); choose "
                             f"one with --measured-engine" + (f" (not {measured_engine!r})" if measured_engine else ""))
        df = df[df["engine"].astype(str) == measured_engine].reset_index(drop=True)
    return df


def compare_groups(profile, engine, where: str = "profile", timed=None):
    """Predicted against measured milliseconds per point and group: one row each, with the error in percent of
    the measured step (a group's absolute miss as a share of the step, so small groups do not dominate).

    `timed`: measurement rows (gpu, model, phase, batch, context, kv_ratio, policy, step_ms) of the same points.
    A profiled step runs eagerly under the profiler, so its own length counts the host's dispatch and the
    profiler's cost; where the point was timed, the timed step is the step, and `gaps` is the timed step less the
    profiled kernels (negative where the profiled kernels took longer than the whole timed step)."""
    import pandas as pd

    from .rows import group_rows

    keys = POINT_KEYS
    points = profile.groupby(keys, sort=True).agg(step_ms=("profiled_step_ms", "first")).reset_index()
    points = points[points["phase"] == "decode"].reset_index(drop=True)
    points["step"] = "profiled"
    if timed is not None and len(timed):
        t = timed[timed["phase"] == "decode"].groupby(keys)["step_ms"].median()
        hit = [tuple(r) in t.index for r in points[keys].itertuples(index=False)]
        points.loc[hit, "step_ms"] = [t[tuple(r)] for r in points.loc[hit, keys].itertuples(index=False)]
        points.loc[hit, "step"] = "timed"
    rows = []
    for grp in group_rows(points, engine, where):
        pred = group_times(grp, engine)
        for i, idx in enumerate(grp.index):
            p = points.iloc[idx]
            measured = profile[(profile[keys] == p[keys]).all(axis=1)].set_index("group")["ms"].copy()
            step = float(p["step_ms"])
            if p["step"] == "timed":
                measured["gaps"] = step - sum(float(measured.get(g, 0.0)) for g in GROUPS if g != "gaps")
            for g in GROUPS:
                m = float(measured.get(g, 0.0))
                q = float(pred[g][i])
                rows.append({**{k: p[k] for k in keys}, "step": p["step"], "step_ms": round(step, 4), "group": g,
                             "measured_ms": round(m, 4), "predicted_ms": round(q, 4),
                             "error_pct_of_step": round(100 * (q - m) / step, 2)})
    return pd.DataFrame(rows)
