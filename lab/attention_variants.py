"""Compare bench_attention's kernel variants: per point, each variant's full-cache and Keyformer microseconds per
layer and Keyformer over the full cache at the same cached tokens (1.00: selection costs nothing), then medians.

Usage: python -m lab.attention_variants ATTENTION_CSV [--json]
"""
from __future__ import annotations

import csv
import json
import statistics
import sys
from collections import defaultdict

#: the options of the option era that changed Keyformer's kernels only (bench_attention then timed the full cache
#: once for variants differing only in these)
KEYFORMER_ONLY_NAMES = ("pos32", "lane_partials", "short_finish")


def full_cache_variant(variant: str) -> str:
    """The variant whose full-cache time stands for `variant`'s: its name less the Keyformer-only options
    (bench_attention times the full cache once for variants that differ only in those)."""
    names = [n for n in variant.split("+") if n not in KEYFORMER_ONLY_NAMES]
    return "+".join(names) or "shipped"


def compare(rows: list[dict]) -> dict:
    """{variant: {"points": {(model, batch, tokens): {"full": us, "keyformer": us, "ratio": kf/full}},
    "median_ratio", "worst_ratio", "median_full_fraction", "median_keyformer_fraction"}} from bench_attention rows
    (the fastest row per variant, point and policy, where several configurations ran)."""
    best: dict = defaultdict(dict)
    fractions: dict = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        key = (r["model"], int(r["batch"]), int(r["tokens"]))
        variant, policy, us = r.get("variant") or "shipped", r["policy"], float(r["us_per_layer"])
        if us < best[variant].get((key, policy), float("inf")):
            best[variant][(key, policy)] = us
            if r.get("fraction"):
                fractions[variant][policy][key] = float(r["fraction"])
    # the full cache's time of each point per variant less its Keyformer-only options (the one bench_attention ran)
    full_of: dict = {}
    for variant, times in best.items():
        for (key, policy), us in times.items():
            base = (full_cache_variant(variant), key)
            if policy == "full" and us < full_of.get(base, float("inf")):
                full_of[base] = us
    out = {}
    for variant, times in best.items():
        points = {}
        for (key, policy), us in times.items():
            points.setdefault(key, {})[policy] = us
        for key, p in points.items():
            if "full" not in p and (us := full_of.get((full_cache_variant(variant), key))):
                p["full"] = us
        for p in points.values():
            if "full" in p and "keyformer" in p:
                p["ratio"] = round(p["keyformer"] / p["full"], 3)
        ratios = [p["ratio"] for p in points.values() if "ratio" in p]
        med = {f"median_{pol}_fraction": round(statistics.median(f.values()), 3) if f else None
               for pol, f in ((pol, fractions[variant][pol]) for pol in ("full", "keyformer"))}
        out[variant] = {"points": points, "median_ratio": round(statistics.median(ratios), 3) if ratios else None,
                        "worst_ratio": max(ratios) if ratios else None, **med}
    return out


def table(result: dict) -> str:
    """A text table: one line per point (full us / Keyformer us / ratio for each variant), then the medians."""
    variants = list(result)
    keys = sorted({k for v in result.values() for k in v["points"]})
    head = f"{'model':10s} {'B':>3s} {'T':>5s} | " + " | ".join(f"{v[:26]:>26s}" for v in variants)
    lines = [head, "-" * len(head)]
    for k in keys:
        cells = []
        for v in variants:
            p = result[v]["points"].get(k, {})
            cells.append(f"{p.get('full', float('nan')):8.1f} {p.get('keyformer', float('nan')):8.1f} "
                         f"{p.get('ratio', float('nan')):8.2f}")
        lines.append(f"{k[0]:10s} {k[1]:3d} {k[2]:5d} | " + " | ".join(cells))
    lines.append("each cell: full us/layer, Keyformer us/layer, Keyformer / full")
    for v in variants:
        r = result[v]
        lines.append(f"{v}: Keyformer/full median {r['median_ratio']} worst {r['worst_ratio']}; HBM fraction median "
                     f"full {r['median_full_fraction']} Keyformer {r['median_keyformer_fraction']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    paths = [a for a in argv if a != "--json"]
    if len(paths) != 1:
        print("usage: python -m lab.attention_variants ATTENTION_CSV [--json]", file=sys.stderr)
        return 2
    try:
        with open(paths[0], newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        print(f"Error: cannot read {paths[0]}: {e.strerror}", file=sys.stderr)
        return 2
    need = {"model", "batch", "tokens", "policy", "us_per_layer"}
    if not rows or not need <= set(rows[0]):
        print(f"Error: {paths[0]} is not a bench_attention CSV (needs columns {', '.join(sorted(need))})",
              file=sys.stderr)
        return 2
    result = compare(rows)
    if "--json" in argv:
        print(json.dumps({v: {**r, "points": [{"model": k[0], "batch": k[1], "tokens": k[2], **p}
                                               for k, p in r["points"].items()]} for v, r in result.items()}))
    else:
        print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
