"""Fit an Engine to measurements: least squares on log(predicted / measured), hardware profiles held fixed.

Parameters are physical and relative to the hardware (fractions of datasheet peaks, microseconds per kernel,
kernels per op, logit passes), so an engine fitted on one GPU predicts another. Only parameters the rows can
inform are fitted: Keyformer's need Keyformer rows, compute fractions need prefill rows.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .engine import IDEAL, Engine
from .errors import KfsimError
from .rows import Group, group_rows

#: engine parameter -> (lower bound, upper bound, starting value). "a.b" is key b of mapping field a.
PARAMETERS = {
    "weight_bandwidth_fraction": (0.2, 1.2, 0.85),
    "kv_bandwidth_fraction": (0.2, 1.2, 0.85),
    "kernel_overhead_us": (0.0, 200.0, 3.0),
    "attention_overhead_us": (0.0, 500.0, 5.0),
    "step_overhead_us": (0.0, 20000.0, 20.0),
    "kernels_per_op.elementwise": (0.0, 30.0, 1.0),
    "kernels_per_op.keyformer": (0.0, 100.0, 10.0),
    "keyformer_logit_passes": (0.0, 100.0, 5.0),
    "attention_saturation_items": (1.0, 20000.0, 200.0),
    "attention_split_tokens": (64.0, 1e6, 1024.0),
    "evicting_attention_split_tokens": (64.0, 1e6, 8192.0),
    "gemm_compute_fraction": (0.05, 1.0, 0.6),
    "attention_compute_fraction": (0.02, 1.0, 0.3),
    "prefill_kernel_overhead_us": (0.0, 500.0, 5.0),
}
#: what each parameter needs in the rows to be identifiable
NEEDS = {"kernels_per_op.keyformer": "scored", "keyformer_logit_passes": "scored",
         "evicting_attention_split_tokens": "scored", "gemm_compute_fraction": "prefill",
         "attention_compute_fraction": "prefill", "prefill_kernel_overhead_us": "prefill"}
MIN_ROWS_PER_PARAMETER = 2


@dataclass(frozen=True)
class Fit:
    engine: Engine
    fitted: dict[str, float]
    ape: np.ndarray  # absolute percentage error per row
    n: int

    @property
    def mape(self) -> float:
        return float(np.mean(self.ape))


def _set(engine: Engine, values: dict[str, float]) -> Engine:
    plain, mapped = {}, {}
    for k, v in values.items():
        if "." in k:
            field, key = k.split(".")
            mapped.setdefault(field, dict(getattr(engine, field)))[key] = float(v)
        else:
            plain[k] = float(v)
    return dataclasses.replace(engine, **plain, **mapped)


def choose_parameters(groups: list[Group]) -> list[str]:
    scored = any(g.setup.policy.scored for g in groups)
    prefill = any(g.phase == "prefill" for g in groups)
    have = {"scored": scored, "prefill": prefill}
    return [p for p in PARAMETERS if have.get(NEEDS.get(p, ""), True)]


def fit(df, name: str = "fitted", start: Engine = IDEAL, where: str = "measurements") -> Fit:
    """Fit the engine parameters the rows of `df` can inform; deterministic for the same rows."""
    from scipy.optimize import least_squares

    groups = group_rows(df.reset_index(drop=True), start, where)
    params = choose_parameters(groups)
    n = sum(len(g.measured_ms) for g in groups)
    if n < MIN_ROWS_PER_PARAMETER * len(params):
        raise KfsimError(f"{where}: {n} usable rows are too few to fit {len(params)} parameters "
                         f"({', '.join(params)}); need at least {MIN_ROWS_PER_PARAMETER * len(params)}")
    lo = np.array([PARAMETERS[p][0] for p in params])
    hi = np.array([PARAMETERS[p][1] for p in params])
    x0 = np.array([PARAMETERS[p][2] for p in params])
    base = dataclasses.replace(start, name=name)

    def residuals(x):
        eng = _set(base, dict(zip(params, x)))
        return np.concatenate([np.log(g.predict_ms(eng) / g.measured_ms) for g in groups])

    with np.errstate(all="ignore"):
        sol = least_squares(residuals, x0, bounds=(lo, hi), x_scale=np.maximum(np.abs(x0), 1e-2), method="trf",
                            max_nfev=400)
    values = dict(zip(params, (float(v) for v in sol.x)))
    engine = _set(base, values)
    ape = 100 * np.abs(np.expm1(residuals(sol.x)))
    return Fit(engine, values, ape, n)
