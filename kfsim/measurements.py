"""The measurement-file schema shared by `kfsim measure`, `calibrate` and `validate`: one CSV row per measured point.

Required: gpu (kfsim profile name), model, batch, context (tokens a full cache holds at that step; the prompt
length for prefill rows), kv_ratio, policy, step_ms (median decode-step time; prefill time for prefill rows).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .errors import KfsimError

REQUIRED = ("gpu", "model", "batch", "context", "kv_ratio", "policy", "step_ms")
#: Optional columns, in the order `kfsim measure` writes them.
OPTIONAL = (
    "phase", "engine", "dtype", "kv_dtype", "window", "cached_tokens", "step_ms_p10", "step_ms_p90", "step_ms_min",
    "n_steps", "warmup_s", "energy_j", "power_w", "sm_mhz", "mem_mhz", "temp_c", "mem_used_gb", "throttle",
    "status", "error", "gpu_name", "driver", "cuda", "torch", "python", "timestamp",
    # the fused attention's opt-in options a compiled-engine row ran with ('+'-joined; empty: the shipped kernel)
    "kernel_options",
    # what code and libraries measured the row: the kfsim checkout's commit ('+dirty' with uncommitted changes),
    # and the versions of triton and transformers where they are installed
    "git_commit", "triton", "transformers",
)
COLUMNS = REQUIRED + OPTIONAL
PHASES = ("decode", "prefill")


def point_key(row: dict) -> tuple:
    """What identifies a measured point (for resuming an interrupted campaign)."""
    return tuple(str(row.get(k, "") or "") for k in ("gpu", "model", "phase", "engine", "batch", "context",
                                                     "kv_ratio", "policy", "kernel_options"))


def done_keys(path: str | Path) -> set[tuple]:
    """Keys of the points already in `path` (ok or failed), so a resumed campaign skips them."""
    path = Path(path)
    if not path.exists():
        return set()
    with path.open(newline="") as f:
        return {point_key(r) for r in csv.DictReader(f)}


def append_row(path: str | Path, row: dict) -> None:
    """Append one row, writing the header first if the file is new; unknown keys are a bug in the caller."""
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise ValueError(f"columns not in the schema: {sorted(unknown)}")
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    fields = list(COLUMNS)
    if not new:  # a file begun by an older kfsim keeps its header; a value it has no column for is refused
        with path.open(newline="") as f:
            fields = next(csv.reader(f), fields)
        if lost := [k for k in COLUMNS if k not in fields and row.get(k) not in (None, "")]:
            raise KfsimError(f"{path} has no column {lost[0]!r} (an older kfsim began it): write to a new file")
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})


def read(path: str | Path, only_ok: bool = True):
    """Read a measurement CSV into a pandas DataFrame, checking the required columns and their values."""
    import pandas as pd

    path = Path(path)
    try:
        df = pd.read_csv(path)
    except FileNotFoundError:
        raise KfsimError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise KfsimError(f"{path}: is a folder; give a measurement CSV file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise KfsimError(f"{path}: not a readable CSV file ({str(exc).splitlines()[0]})") from None
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise KfsimError(f"{path}: missing required column(s) {', '.join(missing)}; required: {', '.join(REQUIRED)}")
    if "status" in df.columns and only_ok:
        df = df[df["status"].fillna("ok") == "ok"]
    if "phase" not in df.columns:
        df["phase"] = "decode"
    df["phase"] = df["phase"].fillna("decode")
    for col, whole, top in (("batch", True, None), ("context", True, None), ("kv_ratio", False, 1.0),
                            ("step_ms", False, None)):
        values = pd.to_numeric(df[col], errors="coerce")
        wrong = values.isna() | ~np.isfinite(values) | (values <= 0)
        if whole:
            wrong |= values != np.floor(values)
        if top is not None:
            wrong |= values > top
        bad = df[col][wrong]
        if len(bad):
            allowed = ("a whole number >= 1" if whole else "a finite number > 0") + (f", at most {top:g}" if top else "")
            raise KfsimError(f"{path}: column {col} has a bad value {bad.iloc[0]!r} at row {bad.index[0] + 2}; "
                             f"allowed: {allowed}")
        df[col] = values.astype(int) if whole else values
    bad_phase = df[~df["phase"].isin(PHASES)]
    if len(bad_phase):
        raise KfsimError(f"{path}: phase {bad_phase['phase'].iloc[0]!r} at row {bad_phase.index[0] + 2}; "
                         f"allowed: {', '.join(PHASES)}")
    return df.reset_index(drop=True)


def load(paths, measured_engine: str | None = None, phase: str = "all"):
    """Read and concatenate measurement files, keeping one measured engine and the chosen phase.

    Files holding several engines (for instance torch-graph and torch-eager rows) need `measured_engine`.
    """
    import pandas as pd

    frames = []
    for p in paths:
        df = read(p)
        df["source"] = str(p)
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    if "engine" in df.columns:
        engines = sorted(df["engine"].dropna().astype(str).unique())
        if measured_engine is not None:
            if measured_engine not in engines:
                raise KfsimError(f"no rows of measured engine {measured_engine!r}; the files hold: "
                                 f"{', '.join(engines) or 'none'}")
            df = df[df["engine"] == measured_engine]
        elif len(engines) > 1:
            raise KfsimError(f"the files hold rows of several engines ({', '.join(engines)}); "
                             f"choose one with --measured-engine")
    elif measured_engine is not None:
        raise KfsimError(f"--measured-engine {measured_engine} given but the files have no engine column")
    if phase != "all":
        df = df[df["phase"] == phase]
    if df.empty:
        raise KfsimError(f"no usable rows in {', '.join(map(str, paths))} (phase {phase}, status ok)")
    return df.reset_index(drop=True)
