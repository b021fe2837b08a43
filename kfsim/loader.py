"""One loader for every YAML file kfsim reads: safe_load, then a frozen dataclass checked field by field.

Unknown keys, missing keys, wrong types and out-of-range values are user errors that name the file and the key.
Ranges and choices live in each dataclass field's metadata (`min`, `max`, `choices`, `min_exclusive`).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import KfsimError

try:  # the C loader is about 10x faster; fall back where libyaml is missing
    _Loader = yaml.CSafeLoader
except AttributeError:  # pragma: no cover
    _Loader = yaml.SafeLoader


#: magnitudes a number in a profile, workload or engine may have (or be 0): every field is a physical figure in the
#: unit its name gives (GB, GB/s, TFLOP/s, tokens, us) and none comes near either end; beyond them, products and
#: quotients overflow
MAX_MAGNITUDE, MIN_MAGNITUDE = 1e9, 1e-9


#: a number written in scientific notation that YAML 1.1 leaves as text
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _in_bounds(value, where: str):
    if abs(value) > MAX_MAGNITUDE:
        raise KfsimError(f"{where}: {value!r} is too large; allowed: at most {MAX_MAGNITUDE:g} in magnitude")
    if value and abs(value) < MIN_MAGNITUDE:
        raise KfsimError(f"{where}: {value!r} is too small; allowed: 0 or at least {MIN_MAGNITUDE:g} in magnitude")
    return value


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping from `path`; missing files and syntax errors become one-line KfsimErrors."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KfsimError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise KfsimError(f"{path}: is a folder, not a YAML file") from None
    except UnicodeDecodeError:
        raise KfsimError(f"{path}: not UTF-8 text (save the YAML as UTF-8)") from None
    except OSError as exc:
        raise KfsimError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise KfsimError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise KfsimError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def closest(name: str, known: typing.Iterable[str]) -> str:
    """A ' (did you mean X?)' hint, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if tp in (float, int) and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e12 and 3.35e3 (no dot or no exponent sign) as text
        value = int(value) if tp is int and value.is_integer() and abs(value) <= MAX_MAGNITUDE else value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise KfsimError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise KfsimError(f"{where}: {value!r} is not a finite number")
        return float(_in_bounds(value, where))
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise KfsimError(f"{where}: expected a whole number, got {value!r}")
        return int(_in_bounds(value, where))
    if tp is bool:
        if not isinstance(value, bool):
            raise KfsimError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise KfsimError(f"{where}: expected text, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise KfsimError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise KfsimError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise KfsimError(f"{where}: expected a mapping, got {value!r}")
        return build(tp, value, where)
    if tp is Any:
        return value
    raise TypeError(f"loader cannot check type {_type_name(tp)}")  # a bug in a dataclass, not user input


def _check_range(value: Any, meta: dict, where: str) -> None:
    if value is None:
        return
    values = value.values() if isinstance(value, dict) else [value]
    for v in values:
        if v is None:
            continue
        if "choices" in meta and v not in meta["choices"]:
            raise KfsimError(f"{where}: {v!r} is not allowed; allowed: {', '.join(map(str, meta['choices']))}")
        if "min" in meta and v < meta["min"]:
            raise KfsimError(f"{where}: {v!r} is below the minimum {meta['min']}")
        if "min_exclusive" in meta and v <= meta["min_exclusive"]:
            raise KfsimError(f"{where}: {v!r} must be greater than {meta['min_exclusive']}")
        if "max" in meta and v > meta["max"]:
            raise KfsimError(f"{where}: {v!r} is above the maximum {meta['max']}")


def build(cls: type, data: dict, where: str) -> Any:
    """Make a `cls` dataclass from `data`, naming `where` (file and key) in every error."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        raise KfsimError(f"{where}: unknown key {key!r}{closest(str(key), fields)}; allowed: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise KfsimError(f"{where}: missing required key {name!r}")
            continue
        value = _coerce(data[name], hints[name], f"{where}: {name}" if ":" not in where else f"{where}.{name}")
        _check_range(value, f.metadata, f"{where}: {name}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except KfsimError as exc:  # a cross-field check in __post_init__: say which file it came from
        raise KfsimError(f"{where}: {exc}") from None


def load(cls: type, path: str | Path, shipped: bool = False) -> Any:
    """Read `path` and build a `cls` from it; a shipped file's name must equal its `name` field."""
    path = Path(path)
    data = read_yaml(path)
    obj = build(cls, data, str(path))
    name = getattr(obj, "name", None)
    if shipped and path.stem != name:
        raise KfsimError(f"{path}: name {name!r} differs from the file name {path.stem!r}")
    return obj


def rng(lo: float | None = None, hi: float | None = None, *, above: float | None = None, choices=None, **kw):
    """Field metadata for a range: `rng(0, 1)` means 0 <= x <= 1; `above=0` means x > 0."""
    meta = {}
    if lo is not None:
        meta["min"] = lo
    if hi is not None:
        meta["max"] = hi
    if above is not None:
        meta["min_exclusive"] = above
    if choices is not None:
        meta["choices"] = tuple(choices)
    return dataclasses.field(metadata=meta, **kw)
