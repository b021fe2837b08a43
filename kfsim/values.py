"""Parse list flags: `1,8,32` or an inclusive range `256:16384:256` (start:stop:step), checked element by element."""
from __future__ import annotations

from typing import Callable

import numpy as np

from .errors import KfsimError


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
    if kind is int:
        if not value.is_integer():
            raise KfsimError(f"--{flag}: {part!r} is not a whole number")
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
    return [kind(start + i * step) for i in range(n)]
