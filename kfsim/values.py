"""Parse list flags: `1,8,32` or an inclusive range `256:16384:256` (start:stop:step), checked element by element."""
from __future__ import annotations

from typing import Callable

import numpy as np

from .errors import KfsimError

#: most elements one list flag expands to (a range like 1:1000000000:1 is refused before it is built)
MAX_ELEMENTS = 1_000_000
#: largest whole number a flag takes (numpy's int64 arithmetic stays exact below it)
MAX_INT = 2 ** 53


def parse_list(text: str, flag: str, kind: Callable = int, lo: float | None = None, hi: float | None = None,
               choices: tuple[str, ...] | None = None) -> list:
    """Values of `--flag` as a list; a bad element is a one-line error naming it and what is allowed."""
    items: list = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            raise KfsimError(f"--{flag} {text!r} has an empty element; use a list like 1,8,32")
        if kind is str and choices is None:
            items.append(part)
            continue
        if choices is not None:
            if part not in choices:
                raise KfsimError(f"--{flag}: {part!r} is not allowed; allowed: {', '.join(choices)}")
            items.append(part)
            continue
        if ":" in part:
            items.extend(_range(part, flag, kind))
        else:
            items.append(_number(part, flag, kind))
    for v in items:
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            allowed = f"{lo:g} <= value" + (f" <= {hi:g}" if hi is not None else "")
            raise KfsimError(f"--{flag}: {v:g} is out of range; allowed: {allowed}")
    return items


def _number(part, flag, kind):
    try:
        value = float(part)
    except ValueError:
        raise KfsimError(f"--{flag}: {part!r} is not a number") from None
    if not np.isfinite(value):
        raise KfsimError(f"--{flag}: {part!r} is not a finite number")
    if kind is int:
        if not value.is_integer():
            raise KfsimError(f"--{flag}: {part!r} is not a whole number")
        if abs(value) > MAX_INT:
            raise KfsimError(f"--{flag}: {part!r} is too large; allowed: at most {MAX_INT:,}")
        return int(value)
    return value


def _range(part, flag, kind):
    bits = part.split(":")
    if len(bits) != 3:
        raise KfsimError(f"--{flag}: range {part!r} must be start:stop:step")
    start, stop, step = (_number(b, flag, kind) for b in bits)
    if step <= 0 or stop < start:
        raise KfsimError(f"--{flag}: range {part!r} needs step > 0 and stop >= start")
    n = int(np.floor((stop - start) / step + 1e-9)) + 1
    if n > MAX_ELEMENTS:
        raise KfsimError(f"--{flag}: range {part!r} has {n:,} values; allowed: at most {MAX_ELEMENTS:,}")
    return [kind(start + i * step) for i in range(n)]
