"""The measurement-file schema shared by `kfsim measure`, `calibrate` and `validate`: one CSV row per measured point.

Required: gpu (kfsim profile name), model, batch, context (tokens a full cache holds at that step; the prompt
length for prefill rows), kv_ratio, policy, step_ms (median decode-step time; prefill time for prefill rows).
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
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
    # the power reading: seconds between the two energy-counter updates it spans, the board idle before the
    # campaign, the enforced power limit, and a flag where the reading is above it (energy not to be trusted)
    "energy_window_s", "idle_w", "power_limit_w", "energy_flag",
    # GPUs the model was split over (tensor parallelism; empty: 1), the step being the slowest GPU's
    "tp",
    # host microseconds to launch one tiny CUDA op right before the row was timed (measure.timing.host_launch_us)
    "host_launch_us",
    # kernel-launching operations one eager step dispatched (measure.host_ops.count; eager transformers rows)
    "host_ops",
    # `kfsim measure --rounds R`: rounds the point was timed in (each round all of a model's points in a shuffled
    # order), and every round's median step, ';'-joined; step_ms and its percentiles are the fastest round's
    "rounds", "round_ms",
)
COLUMNS = REQUIRED + OPTIONAL
PHASES = ("decode", "prefill")


def point_key(row: dict) -> tuple:
    """What identifies a measured point (for resuming an interrupted campaign); tp 1 keys as a row without tp."""
    tp = str(row.get("tp", "") or "")
    return tuple(str(row.get(k, "") or "") for k in ("gpu", "model", "phase", "engine", "batch", "context",
                                                     "kv_ratio", "policy", "kernel_options")) + (
        ("" if tp in ("1", "1.0") else tp),)


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
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
    if new:
        writer.writeheader()
    writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    append_whole(path, text.getvalue().encode("utf-8"))


def append_whole(path: Path, data: bytes) -> None:
    """Append `data` to `path` whole or not at all: a write that fails part-way (a full disk) is cut back off, so
    the file never ends mid-row and looks valid."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as exc:
            os.ftruncate(fd, start)
            raise KfsimError(f"{path}: could not append a row ({exc.strerror}); the file is left as it was, "
                             f"rerun to resume") from None
    finally:
        os.close(fd)


def read_csv(path: str | Path, what: str = "a measurement CSV file"):
    """A CSV file as a pandas DataFrame; a missing, unreadable or folder path is a one-line error."""
    import pandas as pd

    path = Path(path)
    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise KfsimError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise KfsimError(f"{path}: is a folder; give {what}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise KfsimError(f"{path}: not a readable CSV file ({str(exc).splitlines()[0]})") from None


def read(path: str | Path, only_ok: bool = True):
    """Read a measurement CSV into a pandas DataFrame, checking the required columns and their values."""
    df = read_csv(path)
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise KfsimError(f"{path}: missing required column(s) {', '.join(missing)}; required: {', '.join(REQUIRED)}")
    if "status" in df.columns and only_ok:
        df = df[df["status"].fillna("ok") == "ok"]
    return checked(df, path)


def checked(df, path):
    """`df` with its point columns checked (gpu, model, policy named; NUMBERS in range; phase known): a bad cell
    is a one-line error naming the file, the row, the value and what is allowed."""
    if "phase" not in df.columns:
        df["phase"] = "decode"
    df["phase"] = df["phase"].fillna("decode")
    for col in ("gpu", "model", "policy"):
        text = df[col].astype("string").str.strip()
        bad = df[col][text.isna() | (text == "")]
        if len(bad):
            allowed = "a policy name (full, keyformer, ...)" if col == "policy" else f"a name (`kfsim list {col}s`)"
            raise KfsimError(f"{path}: column {col} is empty at row {bad.index[0] + 2}; allowed: {allowed}")
        df[col] = text.astype(str)
    for col, rule in NUMBERS.items():
        if col in df.columns:
            df[col] = _checked(df[col], rule, path)
    df["tp"] = df["tp"].fillna(1).astype(int) if "tp" in df.columns else 1
    bad_phase = df[~df["phase"].isin(PHASES)]
    if len(bad_phase):
        raise KfsimError(f"{path}: phase {bad_phase['phase'].iloc[0]!r} at row {bad_phase.index[0] + 2}; "
                         f"allowed: {', '.join(PHASES)}")
    return df.reset_index(drop=True)


@dataclass(frozen=True)
class Rule:
    """What a numeric column holds: a positive number (or >= 0), whole or not, with an optional top; optional
    columns may be empty."""

    whole: bool = False
    zero_ok: bool = False
    top: float | None = None
    optional: bool = False
    least: float | None = None  # a floor above 0 (a positive number below it is no measurement)

    def allowed(self) -> str:
        low = f">= {self.least:g}" if self.least else ">= 0" if self.zero_ok else "> 0"
        text = "a whole number >= 1" if self.whole else f"a finite number {low}"
        return text + (f", at most {self.top:g}" if self.top else "") + (", or empty" if self.optional else "")


#: the numeric columns kfsim reads, and what each may hold
NUMBERS = {"batch": Rule(whole=True), "context": Rule(whole=True), "kv_ratio": Rule(top=1.0),
           # a step shorter than a nanosecond is no measurement (a denormal one once broke the fit's residuals)
           "step_ms": Rule(least=1e-6),
           "window": Rule(zero_ok=True, top=1.0, optional=True), "power_w": Rule(zero_ok=True, optional=True),
           "mem_used_gb": Rule(zero_ok=True, optional=True), "tp": Rule(whole=True, optional=True)}


def _checked(column, rule: Rule, path):
    """`column` as numbers, or a one-line error naming the file, the row, the value and what is allowed."""
    import pandas as pd

    values = pd.to_numeric(column, errors="coerce")
    empty = column.isna() | (column.astype("string").str.strip() == "")
    wrong = (values.isna() & ~(empty & rule.optional)) | (~values.isna() & ~np.isfinite(values))
    wrong |= (values < 0) if rule.zero_ok else (values <= 0)
    if rule.whole:
        wrong |= values != np.floor(values)
    if rule.top is not None:
        wrong |= values > rule.top
    if rule.least is not None:
        wrong |= values < rule.least
    bad = column[wrong.fillna(True) & ~(empty & rule.optional)]
    if len(bad):
        raise KfsimError(f"{path}: column {column.name} has a bad value {_cell(bad.iloc[0])} at row "
                         f"{bad.index[0] + 2}; allowed: {rule.allowed()}")
    return values.astype(int) if rule.whole and not values.isna().any() else values


def _cell(value) -> str:
    """A CSV cell as a message shows it: 'an empty cell', or the value as it was written (no numpy repr)."""
    import pandas as pd

    from .fmt import scalar

    return "(an empty cell)" if pd.isna(value) else repr(scalar(value))


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
