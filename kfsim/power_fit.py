"""Fit a GPU's power model (kfsim.power) to measured rows, and check it on rows it was not fitted on."""
from __future__ import annotations

import numpy as np

from .engine import Engine
from .errors import KfsimError
from .power import fit
from .rows import group_rows


def rates(df, engine: Engine) -> tuple[np.ndarray, np.ndarray]:
    """Bytes moved and FLOPs of every row's step as kfsim counts them (in row order)."""
    from .predict import logit_passes_of, traffic

    moved, flops = np.empty(len(df)), np.empty(len(df))
    for g in group_rows(df, engine):
        tr = traffic(g.ops, logit_passes_of(g.setup))
        moved[g.index] = np.broadcast_to(tr["moved"], g.batch.shape)
        flops[g.index] = np.broadcast_to(tr["flops"], g.batch.shape)
    return moved, flops


def usable(df):
    """Decode rows with a power reading, none above the board limit; (rows, count dropped as above it, count
    without a reading)."""
    need = {"power_w", "idle_w"}
    if not need <= set(df.columns):
        raise KfsimError("fitting power needs the columns power_w and idle_w (kfsim measure writes them)")
    df = df[df["phase"] == "decode"]
    read = df["power_w"].notna() & df["idle_w"].notna()
    df, unread = df[read], int((~read).sum())
    above = df["power_w"] > df["power_limit_w"] if "power_limit_w" in df.columns else df["power_w"] < 0
    return df[~above.fillna(False)].reset_index(drop=True), int(above.fillna(False).sum()), unread


def fit_rows(df, engine: Engine) -> dict:
    """The power figures of the one GPU in `df`, fitted on its rows."""
    gpus = sorted(df["gpu"].astype(str).unique())
    if len(gpus) != 1:
        raise KfsimError(f"fit power on one GPU's rows at a time; the files hold {', '.join(gpus)}")
    moved, flops = rates(df, engine)
    seconds = df["step_ms"].to_numpy(float) / 1e3
    return {"gpu": gpus[0], **fit(df["power_w"], float(np.median(df["idle_w"])), moved / seconds, flops / seconds)}


def _energy_error_pct(rows, engine: Engine, seconds: np.ndarray, hardware) -> np.ndarray:
    """(predicted / measured - 1) x 100 of each row's energy per step: `hardware(gpu)`'s power model at the step
    times `seconds`."""
    from .power import board_power_w

    moved, flops = rates(rows, engine)
    err = np.empty(len(rows))
    for gpu, idx in rows.groupby("gpu").indices.items():
        power = board_power_w(hardware(str(gpu)), moved[idx], flops[idx], seconds[idx], engine.power_fraction_of_tdp)
        err[idx] = 100 * (power * seconds[idx] / rows["energy_j"].to_numpy(float)[idx] - 1)
    return err


def energy_error_pct(df, hw, figures: dict, engine: Engine) -> np.ndarray:
    """Each row's energy error with `figures` as `hw`'s power model, at the measured step time (the power model's
    error alone)."""
    import dataclasses

    keys = ("idle_w", "pj_per_byte", "pj_per_flop")
    hw = dataclasses.replace(hw, **{k: figures[k] for k in keys},
                             source={**hw.source, **{k: "kfsim fit-power, being checked" for k in keys}})
    return _energy_error_pct(df, engine, df["step_ms"].to_numpy(float) / 1e3, lambda gpu: hw)


def validate_energy(cmp, engine: Engine) -> dict | None:
    """Metrics of the energy per step predicted (the predicted step at the GPU profile's power model) against
    measured `energy_j`, over rows of GPUs whose profile has a power model; None where no row can be checked."""
    from .hardware import get_hardware
    from .power import has_model
    from .validate import metrics

    if "energy_j" not in cmp.columns:
        return None
    rows = cmp[(cmp["phase"] == "decode") & cmp["energy_j"].notna()].reset_index(drop=True)
    rows = rows[[has_model(get_hardware(str(g))) for g in rows["gpu"]]].reset_index(drop=True)
    if "power_limit_w" in rows.columns:
        rows = rows[~(rows["power_w"] > rows["power_limit_w"])].reset_index(drop=True)
    if rows.empty:
        return None
    return metrics(_energy_error_pct(rows, engine, rows["predicted_ms"].to_numpy(float) / 1e3, get_hardware))
