"""Human-readable numbers and JSON-ready values for the CLI."""
from __future__ import annotations

import json

import numpy as np


def si(value: float, unit: str = "", digits: int = 3) -> str:
    """1.234e10, 'B' -> '12.3 GB' (decimal prefixes, as datasheets use)."""
    value = float(value)
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g} {prefix}{unit}"
    return f"{value:.{digits}g} {unit}".rstrip()


def scalar(value):
    """A 0-d or 1-element numpy value as a plain Python value for JSON."""
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0] if value.size == 1 else value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def to_json(fields: dict) -> str:
    return json.dumps({k: scalar(v) for k, v in fields.items()}, indent=2)


def table(rows: list[list[str]], header: list[str] | None = None) -> str:
    """Plain left-aligned columns (numbers right-aligned) separated by two spaces."""
    rows = ([header] if header else []) + rows
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        cells = []
        for i, c in enumerate(r):
            c = str(c)
            numeric = j > 0 or not header
            numeric = numeric and c[:1].isdigit()
            cells.append(c.rjust(widths[i]) if numeric else c.ljust(widths[i]))
        lines.append("  ".join(cells).rstrip())
        if header and j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(df) -> str:
    """A pandas DataFrame as a GitHub Markdown table (numbers as printed by pandas)."""
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in df.columns) + " |"
    body = ["| " + " | ".join("" if v is None else f"{v:g}" if isinstance(v, float) else str(v) for v in row) + " |"
            for row in df.itertuples(index=False)]
    return "\n".join([head, rule] + body)
