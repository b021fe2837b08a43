"""Board power of a decode step: idle power plus energy per byte moved from HBM and per FLOP, at the step's rates.

P = idle_w + pj_per_byte x bytes / t + pj_per_flop x FLOPs / t, capped at the board's TDP. The three figures are
a GPU's (hw_profiles/*.yaml), fitted by `kfsim fit-power` from measured power; a GPU without them falls back to
TDP x the engine's power_fraction_of_tdp (a constant, said as such in the output).
"""
from __future__ import annotations

import numpy as np

from .errors import KfsimError
from .hardware import Hardware


def has_model(hw: Hardware) -> bool:
    return None not in (hw.idle_w, hw.pj_per_byte, hw.pj_per_flop)


def board_power_w(hw: Hardware, moved_bytes, flops, seconds, fallback_fraction: float) -> np.ndarray:
    """Mean board power (W) over a step that moves `moved_bytes` and computes `flops` in `seconds`."""
    seconds = np.asarray(seconds, dtype=float)
    if not has_model(hw):
        return np.full(seconds.shape, hw.tdp_w * fallback_fraction)
    dynamic = (hw.pj_per_byte * np.asarray(moved_bytes) + hw.pj_per_flop * np.asarray(flops)) * 1e-12 / seconds
    return np.minimum(hw.tdp_w, hw.idle_w + dynamic)


def fit(power_w, idle_w, bytes_per_s, flops_per_s) -> dict:
    """pJ per byte and per FLOP (non-negative least squares) that explain `power_w` - `idle_w` from the rows'
    byte and FLOP rates; returns the three figures of a profile and the in-sample error."""
    from scipy.optimize import nnls

    power_w, bytes_per_s, flops_per_s = (np.asarray(a, dtype=float) for a in (power_w, bytes_per_s, flops_per_s))
    if power_w.size < 3:
        raise KfsimError(f"fitting power needs at least 3 rows with power_w, got {power_w.size}")
    A = np.column_stack([bytes_per_s * 1e-12, flops_per_s * 1e-12])
    scale = A.max(axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls(A / scale, power_w - idle_w)
    coef = coef / scale
    predicted = idle_w + A @ coef
    return {"idle_w": round(float(idle_w), 1), "pj_per_byte": round(float(coef[0]), 3),
            "pj_per_flop": round(float(coef[1]), 4),
            "mape_pct": round(float(np.mean(np.abs(predicted / power_w - 1)) * 100), 2), "rows": int(power_w.size)}
