"""Write a campaign folder's manifest.yaml: where and with what its rows were measured, and the command.
Run: python -m measure.manifest OUTDIR COMMAND DESCRIPTION"""
from __future__ import annotations

import csv
import datetime as dt
import sys
from pathlib import Path

import yaml

#: row columns that describe the environment, copied into the manifest where every row agrees
ENVIRONMENT = ("gpu", "gpu_name", "driver", "cuda", "torch", "python", "triton", "transformers", "git_commit",
               "engine", "kernel_options")


def manifest(folder: Path, command: str, description: str) -> dict:
    """The manifest of `folder` from its rows.csv: each environment column's value (a list where rows differ)."""
    with (folder / "rows.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    out = {"campaign": description, "command": command, "rows": len(rows)}
    for col in ENVIRONMENT:
        values = sorted({r.get(col, "") for r in rows} - {""})
        if values:
            out[col] = values[0] if len(values) == 1 else values
    stamps = sorted(r["timestamp"] for r in rows if r.get("timestamp"))
    out["date"] = stamps[0][:10] if stamps else dt.date.today().isoformat()
    out["files"] = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != "manifest.yaml")
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.splitlines()[-1].strip(), file=sys.stderr)
        return 2
    folder = Path(argv[0])
    (folder / "manifest.yaml").write_text(yaml.safe_dump(manifest(folder, argv[1], argv[2]), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
