"""Fit an Engine to measurements: least squares on log(predicted / measured), hardware profiles held fixed.

Parameters are physical and relative to the hardware (fractions of datasheet peaks, microseconds per kernel,
kernels per op, logit passes), so an engine fitted on one GPU predicts another. Only parameters the rows can
inform are fitted: Keyformer's need Keyformer rows, compute fractions need prefill rows.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .breakdown import POINT_KEYS, group_times
from .engine import IDEAL, Engine
from .errors import KfsimError
from .rows import Group, group_rows, host_launch_of

#: engine parameter -> (lower bound, upper bound, starting value). "a.b" is key b of mapping field a.
PARAMETERS = {
    "weight_bandwidth_fraction": (0.2, 1.0, 0.85),
    "kv_bandwidth_fraction": (0.2, 1.0, 0.85),
    "kernel_overhead_us": (0.0, 200.0, 3.0),
    "layer_overhead_us": (0.0, 1000.0, 20.0),
    "step_overhead_us": (0.0, 200.0, 20.0),  # graph launch, host sync: not per-layer work
    "kernels_per_op.keyformer": (0.0, 100.0, 20.0),
    # rotary embeddings' kernels per op (2 ops a layer): only a profile separates them from the layer's fixed cost
    "kernels_per_op.positional": (0.0, 100.0, 1.0),
    "keyformer_logit_passes": (0.0, 100.0, 5.0),
    "keyformer_flops_per_kv_byte": (0.0, 1000.0, 10.0),
    "attention_saturation_items": (1.0, 20000.0, 200.0),
    "attention_split_tokens": (64.0, 1e6, 1024.0),
    "evicting_attention_split_tokens": (64.0, 1e6, 8192.0),
    # matrix-vector kernels (batches up to the engine's matvec_max_batch): their own weight streaming, and how
    # many of the GEMM, norm and elementwise kernels remain (fused prologues and epilogues take in the rest)
    "matvec_bandwidth_fraction": (0.2, 1.0, 0.85),
    "matvec_kernels_per_op.gemm": (0.0, 1.0, 0.5),  # at most kernels_per_op's 1 (Engine.matvec_problem)
    "matvec_kernels_per_op.norm": (0.0, 1.0, 0.5),
    "matvec_kernels_per_op.elementwise": (0.0, 1.0, 0.5),
    # an eager framework: host dispatch per kernel and per step, and KV moved more than once (copying appends)
    "host_us_per_kernel": (0.0, 500.0, 10.0),
    "host_step_us": (0.0, 1e5, 1000.0),
    "kv_traffic_factor": (1.0, 20.0, 1.5),
    "evicting_kv_traffic_factor": (1.0, 20.0, 1.5),
    "grouped_kv_expansion": (0.0, 1.0, 0.2),
    # concatenations with a strided input (counted per model: Engine.kv_passes), PyTorch's generic copy
    "strided_copy_gbps_per_sm": (0.5, 50.0, 5.0),
}
#: fitted on prefill rows, after the decode parameters
PREFILL_PARAMETERS = {
    "gemm_compute_fraction": (0.05, 1.0, 0.6),
    "attention_compute_fraction": (0.02, 1.0, 0.3),
    "prefill_kernel_overhead_us": (0.0, 500.0, 5.0),
    "keyformer_prefill_logit_passes": (0.0, 100.0, 5.0),
    # passes over materialised attention scores, counted per model (Engine.prefill_attention)
    "score_bandwidth_fraction": (0.05, 1.0, 0.7),
}
#: what each parameter needs in the rows to be identifiable
NEEDS = {"kernels_per_op.keyformer": "unfused scorer", "keyformer_logit_passes": "uncounted scorer",
         "keyformer_flops_per_kv_byte": "fused scorer",
         "evicting_attention_split_tokens": "scored", "keyformer_prefill_logit_passes": "uncounted prefill scorer",
         "score_bandwidth_fraction": "counted scores",
         "matvec_bandwidth_fraction": "matvec", "matvec_kernels_per_op.gemm": "matvec",
         "matvec_kernels_per_op.norm": "matvec", "matvec_kernels_per_op.elementwise": "matvec",
         "kernels_per_op.positional": "profiled positional", "host_us_per_kernel": "host dispatch",
         "host_step_us": "host dispatch", "kv_traffic_factor": "kv traffic",
         "evicting_kv_traffic_factor": "evicting kv traffic", "grouped_kv_expansion": "grouped kv traffic",
         "strided_copy_gbps_per_sm": "strided copies"}
MIN_ROWS_PER_PARAMETER = 2
#: A scorer fused into the attention kernel (measure/fused_attention.py) is not fitted for its logit traffic and
#: launches: it writes one fp32 z per query head and cached token and reads it back once (2 passes), and its
#: finishing kernel takes the place of the full cache's combine (no launch of its own).
FUSED_SCORER = {"keyformer_logit_passes": 2.0, "kernels_per_op.keyformer": 0.0}


@dataclass(frozen=True)
class Fit:
    engine: Engine
    fitted: dict[str, float]
    ape: np.ndarray  # absolute percentage error per row
    n: int
    profiled: int = 0  # profiled group times fitted beside the rows

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


def choose_parameters(groups: list[Group], table: dict, fused_scorer: bool = False,
                      host_dispatch: bool = False, profiled_names: frozenset = frozenset(),
                      kv_traffic: bool = False) -> list[str]:
    """The parameters of `table` that `groups` can inform (Keyformer costs need rows of a scored policy; the
    fused scorer's arithmetic needs a decoder that scores inside its attention kernel; matrix-vector kernels need
    rows at batches up to the engine's matvec_max_batch; host dispatch needs an eager decoder; KV traffic an eager
    decoder or `kv_traffic`, and full-cache rows of a model whose passes were not counted (Engine.kv_passes; grouped
    heads' expansion: uncounted rows of models with and without grouped KV heads); strided copies' bandwidth, a
    counted model whose rows make them; an unfused scorer's logit passes, scored rows whose cache was not counted
    (Engine.counted_scored_passes); rotary kernels need a profile with their time, `profiled_names` its fitted
    groups; prefill's logit passes, scored rows whose prefill attention was not counted (Engine.counted_prefill),
    and the bandwidth over materialised scores, rows whose count has score bytes)."""
    scored = any(g.setup.policy.scored for g in groups)
    limit = groups[0].setup.engine.matvec_max_batch if groups else 0.0
    matvec = limit > 0 and any(np.any(g.batch <= limit) for g in groups)
    traffic = host_dispatch or kv_traffic
    counted = {id(g): None if g.setup.policy.evicts else
               g.setup.engine.counted_kv_passes(g.setup.workload, g.batch, g.cached) for g in groups}
    counted_scored = {id(g) for g in groups if g.setup.policy.scored
                      and g.setup.engine.counted_scored_passes(g.setup.workload, g.setup.policy.kind) is not None}
    uncounted = [g for g in groups if counted[id(g)] is None and id(g) not in counted_scored]
    have = {"scored": scored, "fused scorer": scored and fused_scorer, "unfused scorer": scored and not fused_scorer,
            "uncounted scorer": scored and not fused_scorer and any(g.setup.policy.scored for g in uncounted),
            "matvec": matvec, "host dispatch": host_dispatch,
            "kv traffic": traffic and any(not g.setup.policy.evicts for g in uncounted),
            "evicting kv traffic": traffic and any(g.setup.policy.evicts for g in uncounted),
            "grouped kv traffic": traffic and len({g.setup.workload.n_heads == g.setup.workload.n_kv_heads
                                                   for g in uncounted}) == 2,
            "strided copies": any(c is not None and np.any(c[1] > 0) for c in counted.values()),
            "profiled positional": "positional" in profiled_names,
            "uncounted prefill scorer": any(g.setup.policy.scored and g.setup.engine.counted_prefill(
                g.setup.workload, g.setup.policy.kind) is None for g in groups),
            "counted scores": any((c := g.setup.engine.counted_prefill(g.setup.workload, g.setup.policy.kind))
                                  is not None and c["score_bytes"] > 0 for g in groups)}
    return [p for p in table if have.get(NEEDS.get(p, ""), True)]


def _fit_stage(groups: list[Group], base: Engine, table: dict, where: str, what: str,
               fused_scorer: bool = False, host_dispatch: bool = False,
               profiled: list[tuple[Group, dict[str, np.ndarray]]] = (), kv_traffic: bool = False
               ) -> tuple[Engine, dict]:
    from scipy.optimize import least_squares

    names = frozenset(name for _, measured in profiled for name in measured)
    params = choose_parameters(groups, table, fused_scorer, host_dispatch, names, kv_traffic)
    n = sum(len(g.measured_ms) for g in groups)
    if n < MIN_ROWS_PER_PARAMETER * len(params):
        raise KfsimError(f"{where}: {n} {what} rows are too few to fit {len(params)} parameters "
                         f"({', '.join(params)}); need at least {MIN_ROWS_PER_PARAMETER * len(params)}")
    lo = np.array([table[p][0] for p in params])
    hi = np.array([table[p][1] for p in params])
    x0 = np.array([table[p][2] for p in params])
    # scale-like parameters spanning decades (tokens per split, work items) are searched in log space
    logs = (lo > 0) & (hi / np.where(lo > 0, lo, 1) >= 100)
    to_x = lambda v: np.where(logs, np.log(np.where(logs, v, 1.0)), v)  # noqa: E731
    from_x = lambda x: np.where(logs, np.exp(np.where(logs, x, 0.0)), x)  # noqa: E731

    start_x, span = to_x(x0), to_x(hi) - to_x(lo)

    def residuals(x):
        eng = _set(base, dict(zip(params, from_x(x))))
        errors = [np.log(g.predict_ms(eng) / g.measured_ms) for g in groups]
        for g, measured in profiled:
            model = group_times(g, eng)
            errors += [np.log(model[name] / ms) for name, ms in measured.items()]
        # a faint pull toward the table's start value: a direction the rows leave flat has one minimum, the same
        # on every machine, instead of wherever rounding noise stops the search (too weak to move a fitted one)
        return np.concatenate(errors + [PULL * (x - start_x) / span])

    best = None
    with np.errstate(all="ignore"):
        for start in [start_x] + [to_x(lo) + f * span for f in EXTRA_STARTS]:
            sol = least_squares(residuals, start, bounds=(to_x(lo), to_x(hi)),
                                x_scale=np.where(logs, 1.0, np.maximum(np.abs(x0), 1e-2)), method="trf",
                                max_nfev=500, ftol=1e-10, xtol=1e-10)
            if best is None or sol.cost < best.cost * (1 - TIE):  # a near-tie keeps the earlier start
                best = sol
    x = _snap(best.x, to_x(lo), to_x(hi))
    values = dict(zip(params, (float(v) for v in from_x(x))))
    return _set(base, values), values


#: operation groups a profile's kernel times fit (kfsim.breakdown; gaps and the small groups are left to the steps)
FIT_GROUPS = ("projections", "attention", "keyformer", "ffn", "positional", "lm_head")
#: a profiled group shorter than this (ms) is not fitted: launch-sized kernels say more about the profiler
MIN_GROUP_MS = 0.05


def profiled_groups(profile, engine: Engine, where: str) -> list[tuple[Group, dict[str, np.ndarray]]]:
    """(points, {group: measured ms}) per configuration of a profile (kfsim measure --profile): each fitted
    operation group that the profile and the model both have at every point."""
    wide = profile[profile["phase"] == "decode"].pivot_table(index=POINT_KEYS, columns="group", values="ms",
                                                             aggfunc="median").reset_index()
    out = []
    for g in group_rows(wide.assign(step_ms=np.nan), engine, where):
        model = group_times(g, engine)
        measured = {name: wide[name].to_numpy(float)[g.index] for name in FIT_GROUPS if name in wide.columns}
        measured = {name: ms for name, ms in measured.items() if np.all(ms >= MIN_GROUP_MS) and np.all(model[name] > 0)}
        if measured:
            out.append((g, measured))
    return out


#: weight of the pull toward the start value, per parameter's range (log residuals of fitted rows are ~1e-2 each)
PULL = 1e-3
#: more starting points, as fractions of each parameter's range (in search space): the step time is piecewise
#: (max of memory and compute, split counts), so one start can stop in a valley that another start leaves
EXTRA_STARTS = (0.25, 0.75)
#: a start's fit replaces an earlier one only where its cost is lower by more than this fraction: two valleys within
#: it fit the rows alike, and which is lower by less can change with the machine's rounding (hf-eager: 0.05 %
#: between two starts that put 8 and 39 us in the fixed cost per step)
TIE = 1e-3
#: a parameter this close to a bound (fraction of its range in search space) ends exactly on it
SNAP = 1e-6


def _snap(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Values within SNAP of a bound put on it (1e-16 and 6e-12 of a lower bound 0 are both 0)."""
    tol = SNAP * (hi - lo)
    return np.where(x - lo <= tol, lo, np.where(hi - x <= tol, hi, x))


def at_bounds(fitted: dict[str, float], caps: dict[str, float]) -> dict[str, str]:
    """Fitted parameters that ended on a bound of their range: parameter -> 'lower' or 'upper' bound. A value on a
    bound means the rows wanted it further out (or could not inform it): the fit is worth a second look."""
    table = {**PARAMETERS, **PREFILL_PARAMETERS}
    out = {}
    for p, v in fitted.items():
        if p not in table:
            continue
        lo, hi, _ = table[p]
        hi = min(hi, caps.get(p, hi))
        tol = SNAP * (hi - lo)
        if v - lo <= tol:
            out[p] = f"lower bound {lo:g}"
        elif hi - v <= tol:
            out[p] = f"upper bound {hi:.4g}" + (" (microbenchmark cap)" if p in caps else "")
    return out


def ceilings(micro, hw) -> dict[str, float]:
    """Upper bounds from microbenchmarks on the same GPU: no GEMM or matrix-vector kernel streams weights faster
    than the skinny GEMM benchmark or the plain HBM read did (the batch-1 matrix-vector kernels of
    measure/gemv.py come close to the read), and no attention reads KV faster than the best SDPA decode benchmark
    (as fractions)."""
    out = {}
    gbps = micro["gbps"].astype(float)
    micro = micro[np.isfinite(gbps) & (gbps > 0)]  # a blank, NaN or non-positive rate caps nothing
    reads = micro[micro["bench"].isin(["skinny_gemm", "hbm_read"])]
    if len(reads):
        out["weight_bandwidth_fraction"] = float(reads["gbps"].max()) / hw.hbm_bandwidth_gbps
        out["matvec_bandwidth_fraction"] = out["weight_bandwidth_fraction"]
    sdpa = micro[micro["bench"] == "sdpa_decode"]
    if len(sdpa):
        out["kv_bandwidth_fraction"] = float(sdpa["gbps"].max()) / hw.hbm_bandwidth_gbps
    return out


def copy_rates(micro, hw) -> dict[str, float]:
    """Engine values measured outright by microbenchmarks on the same GPU: the GB/s per SM of a concatenation
    with a strided input (benches cat_strided and cat_strided_token, their median); {} without."""
    gbps = micro.loc[micro["bench"].isin(["cat_strided", "cat_strided_token"]), "gbps"].astype(float)
    gbps = gbps[np.isfinite(gbps) & (gbps > 0)]
    return {"strided_copy_gbps_per_sm": float(gbps.median()) / hw.sm_count} if len(gbps) else {}


def fit_interconnect(micro, hw) -> dict[str, float]:
    """The engine's interconnect terms from all-reduce microbenchmark rows (bench `allreduce`, `kfsim microbench
    --tp N`) on GPUs of profile `hw`: a least-squares line through time against the bytes each GPU sends
    (2(tp-1)/tp of the message), whose intercept is the fixed time per all-reduce and whose slope is one over the
    achieved one-way bandwidth; {} where there are no such rows. Deterministic (a closed-form fit)."""
    from .parallel import bus_factor

    rows = micro[micro["bench"] == "allreduce"] if "bench" in micro.columns else micro.iloc[:0]
    if not len(rows):
        return {}
    tp = rows["tp"].astype(float).to_numpy()
    sent = np.array([bus_factor(int(n)) for n in tp]) * rows["bytes"].astype(float).to_numpy()
    seconds = rows["median_ms"].astype(float).to_numpy() * 1e-3
    ok = np.isfinite(sent) & np.isfinite(seconds) & (seconds > 0) & (tp > 1)
    if ok.sum() < 2 or np.ptp(sent[ok]) <= 0:
        raise KfsimError(f"all-reduce microbenchmark: {int(ok.sum())} usable row(s) of one message size; the "
                         f"interconnect fit needs at least two sizes (kfsim microbench --tp N measures 16)")
    from scipy.optimize import nnls

    (latency_s, s_per_byte), _ = nnls(np.column_stack([np.ones(ok.sum()), sent[ok]]), seconds[ok])
    one_way = hw.interconnect_gbps / 2 * 1e9
    if s_per_byte <= 0 or one_way <= 0:
        raise KfsimError(f"all-reduce microbenchmark on {hw.name}: time does not grow with the message, or the "
                         f"profile has no interconnect bandwidth; no interconnect fit")
    return {"allreduce_latency_us": latency_s * 1e6, "interconnect_bandwidth_fraction": 1 / s_per_byte / one_way}


#: a host-ops table's columns of every dispatched aten op (views included), read where present; an older table
#: has only the kernel-launching ops' columns
DISPATCHED = ("dispatched_per_layer", "dispatched_per_step")


def read_host_ops(path) -> dict[str, dict]:
    """measure.host_ops's table as Engine.host_ops: each model's operations per layer and per step with the full
    cache, and how many more per layer a scoring policy (keyformer, h2o) dispatches: every aten op dispatched where
    the table counts them (DISPATCHED), else the kernel-launching ones."""
    df = _read_counts(path, "a host-ops table of measure.host_ops", ("model", "policy"),
                      ("ops_per_layer", "ops_per_step"), optional=DISPATCHED)
    columns = DISPATCHED if set(DISPATCHED) <= set(df.columns) else ("ops_per_layer", "ops_per_step")
    table = {}
    for model, family, rows in _by_model(df, path):
        by_policy = {str(p): r for p, r in rows.set_index("policy").iterrows()}
        if "full" not in by_policy:
            raise KfsimError(f"{path}: {model} has no full-cache row (the count every policy starts from)")
        numbers = {p: (float(r[columns[0]]), float(r[columns[1]])) for p, r in by_policy.items()}
        if any(not np.isfinite(v) or v < 0 for pair in numbers.values() for v in pair):
            raise KfsimError(f"{path}: {model}'s counts must be numbers >= 0, got {numbers}")
        layer, step = numbers["full"]
        counts = {"family": family, "layer": layer, "step": step}
        scorers = [numbers[p][0] - layer for p in ("keyformer", "h2o") if p in numbers]
        if scorers:
            counts["scorer_layer"] = max(0.0, max(scorers))
        table[str(model)] = counts
    return _as_engine_has_it(path, host_ops=table)


def _read_counts(path, what: str, keys: tuple, numbers: tuple, optional: tuple = ()):
    """A CSV of per-model counts with columns `keys` and `numbers` (text in a number column becomes NaN, for the
    caller to refuse) and, where present, `optional` number columns (empty cells NaN, text refused here); a
    KfsimError naming the file where it is not one."""
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise KfsimError(f"{path}: not {what} ({type(exc).__name__})") from None
    if missing := [c for c in (*keys, *numbers) if c not in df.columns]:
        raise KfsimError(f"{path}: not {what} (no column {missing[0]})")
    for column in numbers:
        df[column] = pd.to_numeric(df[column], errors="coerce")
    for column in (c for c in optional if c in df.columns):
        raw, df[column] = df[column], pd.to_numeric(df[column], errors="coerce")
        if (bad := raw[df[column].isna() & raw.notna()]).size:
            raise KfsimError(f"{path}: {column} {bad.iloc[0]!r} is not a number")
    return df


def _by_model(df, path):
    """(model, its workload's family, its rows) per model of a counts table; an unknown model names the file."""
    from .workload import get_workload

    for model, rows in df.groupby("model", sort=True):
        try:
            yield model, get_workload(str(model)).family, rows
        except KfsimError as exc:
            raise KfsimError(f"{path}: {exc}") from None


def read_kv_passes(path) -> dict[str, dict]:
    """measure.kv_passes's table as Engine.kv_passes: each model's passes over its attended KV per path."""
    # scorer: scored paths only, empty on the others and absent from a table of full caches
    df = _read_counts(path, "a KV-passes table of measure.kv_passes", ("model", "path"), ("streamed", "strided"),
                      optional=("scorer",))
    import pandas as pd

    def passes(r) -> dict:
        scorer = r.get("scorer")
        return {"streamed": float(r["streamed"]), "strided": float(r["strided"]),
                **({} if scorer is None or pd.isna(scorer) else {"scorer": float(scorer)})}

    table = {str(model): {"family": family, **{str(r["path"]): passes(r) for _, r in rows.iterrows()}}
             for model, family, rows in _by_model(df, path)}
    return _as_engine_has_it(path, kv_passes=table)


def read_prefill_counts(path) -> dict[str, dict]:
    """measure.prefill_counts's table as Engine.prefill_attention: each model's prefill attention per score and
    path."""
    from .engine import PREFILL_COUNTS

    df = _read_counts(path, "a prefill-counts table of measure.prefill_counts", ("model", "path"), PREFILL_COUNTS)
    table = {str(model): {"family": family, **{str(r["path"]): {k: float(r[k]) for k in PREFILL_COUNTS}
                                               for _, r in rows.iterrows()}}
             for model, family, rows in _by_model(df, path)}
    return _as_engine_has_it(path, prefill_attention=table)


def _as_engine_has_it(path, **field):
    """The one table in `field`, once Engine's own check of it passed (its error prefixed with the file read)."""
    try:
        dataclasses.replace(IDEAL, **field)
    except KfsimError as e:
        raise KfsimError(f"{path}: {e}") from None
    return next(iter(field.values()))


def fit(df, name: str = "fitted", start: Engine = IDEAL, where: str = "measurements",
        bounds: dict[str, float] | None = None, fused_scorer: bool = False, matvec_max_batch: float = 0.0,
        host_dispatch: bool = False, profile=None, profile_where: str = "profile", kv_traffic: bool = False) -> Fit:
    """Fit decode parameters on decode rows, then prefill parameters on prefill rows; deterministic.

    `bounds` caps parameters (for instance from `ceilings` of microbenchmarks on the same GPU); `fused_scorer`:
    the measured decoder scores Keyformer inside its attention kernel, so keyformer_flops_per_kv_byte is fitted
    and the scorer's logit passes and launches are those of that kernel (FUSED_SCORER);
    `matvec_max_batch`: the measured decoder runs matrix-vector kernels up to this batch, so their bandwidth and
    kernel counts are fitted apart from the GEMMs'; `host_dispatch`: an eager decoder (host cost per kernel and step,
    KV traffic); `kv_traffic`: KV traffic without host dispatch (a graph-replayed stack that still moves the cache
    more than once); `profile` (kfsim.breakdown.read_profile): steps by operation
    group, whose kernel times are fitted beside the rows' steps, each group against the model's time for it.
    """
    start = dataclasses.replace(start, matvec_max_batch=float(matvec_max_batch))
    # the host terms are fitted on the decode rows, at their median host
    launch = host_launch_of(df[df["phase"] == "decode"]) if host_dispatch else None
    if launch:
        launch = _round(launch)
        start = dataclasses.replace(start, host_launch_us=launch)
    if fused_scorer:
        start = _set(start, FUSED_SCORER)
    groups = group_rows(df.reset_index(drop=True), start, where)
    decode = [g for g in groups if g.phase == "decode"]
    prefill = [g for g in groups if g.phase == "prefill"]
    if not decode:
        raise KfsimError(f"{where}: no decode rows (phase decode); calibration needs them")
    table = dict(PARAMETERS)
    for p, cap in (bounds or {}).items():
        lo, hi, x0 = table[p]
        table[p] = (lo, min(hi, cap), min(x0, 0.98 * cap))
    profiled = profiled_groups(profile, start, profile_where) if profile is not None else []
    engine, fitted = _fit_stage(decode, dataclasses.replace(start, name=name), table, where, "decode", fused_scorer,
                                host_dispatch, profiled, kv_traffic)
    engine, fitted = _matvec_no_slower(engine, fitted)
    if prefill:
        engine, more = _fit_stage(prefill, engine, PREFILL_PARAMETERS, where, "prefill")
        fitted.update(more)
    engine, more = _power_and_workspace(df.reset_index(drop=True), groups, engine)
    fitted.update(more)
    if launch:
        fitted["host_launch_us"] = launch
    ape = np.concatenate([100 * np.abs(g.predict_ms(engine) / g.measured_ms - 1) for g in groups])
    return Fit(engine, fitted, ape, len(ape), sum(len(ms) for _, measured in profiled for ms in measured.values()))


def _matvec_no_slower(engine: Engine, fitted: dict) -> tuple[Engine, dict]:
    """The fit with its matrix-vector kernels made no slower than the GEMM path (Engine.matvec_problem), where the
    rows left them a hair slower (within the fit's noise, the same speed); the errors reported are this engine's."""
    if engine.matvec_max_batch <= 0:
        return engine, fitted
    values = {"matvec_bandwidth_fraction": max(engine.matvec_bandwidth_fraction, engine.weight_bandwidth_fraction)}
    for kind, n in engine.matvec_kernels_per_op.items():
        values[f"matvec_kernels_per_op.{kind}"] = min(n, engine.kernels(kind))
    values = {k: v for k, v in values.items() if k in fitted}
    return _set(engine, values), {**fitted, **values}


def _power_and_workspace(df, groups: list[Group], engine: Engine) -> tuple[Engine, dict]:
    """Board power as a fraction of TDP (median over decode rows with NVML power), and the memory held beyond
    weights, KV and scores (median of NVML's memory used minus kfsim's footprint), where the rows carry them."""
    from . import memory

    power, spare = [], []
    for g in groups:
        if g.phase != "decode":
            continue
        rows = df.loc[g.index]
        if "power_w" in rows:
            power += list(rows["power_w"].dropna() / g.setup.hw.tdp_w)
        if "mem_used_gb" in rows:
            s = g.setup
            held = memory.footprint(s.workload, s.policy, s.dtypes, dataclasses.replace(engine, workspace_gb=0.0),
                                    g.batch, g.cached)
            spare += list(rows["mem_used_gb"].to_numpy(float) - held / 1e9)
    values = {}
    if power:
        values["power_fraction_of_tdp"] = float(np.clip(np.median(power), 0.01, 1.0))
    spare = [x for x in spare if np.isfinite(x)]
    if spare:
        values["workspace_gb"] = float(max(0.0, np.median(spare)))
    return dataclasses.replace(engine, **values), values


def _round(v: float) -> float:
    return float(f"{v:.4g}")


def rounded(engine: Engine, **fields) -> Engine:
    """The engine with every number at 4 significant digits (readable files; same file for the same fit)."""
    plain = {f.name: _round(getattr(engine, f.name)) for f in dataclasses.fields(engine)
             if isinstance(getattr(engine, f.name), float)}
    counts = {name: {k: _round(v) for k, v in getattr(engine, name).items()}
              for name in ("kernels_per_op", "matvec_kernels_per_op")}
    return dataclasses.replace(engine, **plain, **counts, **fields)


def bounds_of(param: str, caps: dict[str, float]) -> str:
    """The range a parameter was fitted in, as text ('median of rows' for those read straight off the rows)."""
    table = {**PARAMETERS, **PREFILL_PARAMETERS}
    if param not in table:
        return "median of the rows"
    lo, hi, _ = table[param]
    return f"{lo:g} .. {min(hi, caps.get(param, hi)):.4g}"
