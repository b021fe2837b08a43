"""Predicted against measured for every row: error metrics, tables by model/policy/phase, plots and a Markdown report."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .engine import Engine
from .fmt import markdown_table
from .rows import predict_frame

GROUPS = ["phase", "gpu", "model", "policy", "kv_ratio"]


def compare(df, engine: Engine, where: str = "measurements"):
    """`df` with `predicted_ms` and `error_pct` ((predicted / measured - 1) x 100) columns added."""
    out = df.reset_index(drop=True).copy()
    out["predicted_ms"] = predict_frame(out, engine, where)
    out["error_pct"] = 100 * (out["predicted_ms"] / out["step_ms"] - 1)
    return out


def metrics(err_pct) -> dict:
    """MAPE, median and worst absolute percentage error (percent) and the row count."""
    ape = np.abs(np.asarray(err_pct, dtype=float))
    if not ape.size:
        return {"mape": None, "median_ape": None, "max_ape": None, "n": 0}
    return {"mape": round(float(ape.mean()), 3), "median_ape": round(float(np.median(ape)), 3),
            "max_ape": round(float(ape.max()), 3), "n": int(ape.size)}


def has_tp(cmp) -> bool:
    """Whether any row is tensor-parallel (tp > 1): such rows are then reported apart."""
    return "tp" in cmp.columns and bool((cmp["tp"] > 1).any())


def by_tp(cmp) -> list[dict]:
    """Metrics per tensor-parallel degree ([] where every row runs on one GPU)."""
    if not has_tp(cmp):
        return []
    return [{"tp": int(tp), **metrics(g["error_pct"])} for tp, g in cmp.groupby("tp")]


def by_group(cmp, keys=None):
    """One row per group with its metrics and mean signed error (bias); groups split by tp where rows differ."""
    import pandas as pd

    keys = keys or (GROUPS + ["tp"] if has_tp(cmp) else GROUPS)
    rows = []
    for key, g in cmp.groupby(keys, sort=True):
        rows.append({**dict(zip(keys, key if isinstance(key, tuple) else (key,))), **metrics(g["error_pct"]),
                     "bias_pct": round(float(g["error_pct"].mean()), 2)})
    return pd.DataFrame(rows)


def plots(cmp, out_dir: Path, title: str) -> list[Path]:
    """Predicted vs measured (log-log), and error against context and against batch; PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    markers = {"full": "o", "keyformer": "^", "h2o": "s", "window": "D"}
    colours = dict(zip(sorted(cmp["model"].unique()), plt.rcParams["axes.prop_cycle"].by_key()["color"]))

    def scatter(ax, x, y, g):
        """Filled markers for decode steps, hollow ones for prefills."""
        for (phase, model, policy), s in g.groupby(["phase", "model", "policy"]):
            hollow = phase == "prefill"
            ax.scatter(s[x], s[y], marker=markers.get(policy, "o"), alpha=0.8, s=28,
                       facecolors="none" if hollow else colours[model], edgecolors=colours[model],
                       label=f"{model} {policy} {phase}")

    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    scatter(ax, "step_ms", "predicted_ms", cmp)
    lo, hi = cmp[["step_ms", "predicted_ms"]].min().min() * 0.8, cmp[["step_ms", "predicted_ms"]].max().max() * 1.25
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="exact")
    ax.fill_between([lo, hi], [lo / 1.1, hi / 1.1], [lo * 1.1, hi * 1.1], color="grey", alpha=0.15, label="±10%")
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel="measured time (ms)",
           ylabel="predicted time (ms)", title=f"{title}\npredicted vs measured (decode steps and prefills)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    paths.append(out_dir / "predicted_vs_measured.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    for x, label in (("context", "context (tokens; prompt length for prefill)"), ("batch", "batch (sequences)")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        scatter(ax, x, "error_pct", cmp)
        ax.axhline(0, color="k", lw=0.8)
        for b in (-10, -5, 5, 10):
            ax.axhline(b, color="grey", lw=0.6, ls=":" if abs(b) == 5 else "--")
        ax.set(xscale="log", xlabel=label, ylabel="error: predicted / measured - 1 (%)",
               title=f"{title}\nerror against {x}")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        paths.append(out_dir / f"error_vs_{x}.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def markdown(cmp, engine: Engine, title: str, sources: list[str], figures: list[Path], by_op=None) -> str:
    """A report: overall metrics, metrics by group, figures, and where every number came from."""
    m = metrics(cmp["error_pct"])
    lines = [f"# {title}", "", f"Engine `{engine.name}`" + (f" (fitted on {engine.fitted_on})" if engine.fitted_on
                                                              else ""),
             f"Measurements: {', '.join(f'`{s}`' for s in sources)}; {m['n']} rows.", "",
             "| rows | MAPE % | median APE % | worst APE % |", "| --- | --- | --- | --- |",
             f"| all | {m['mape']} | {m['median_ape']} | {m['max_ape']} |"]
    for phase, g in cmp.groupby("phase"):
        pm = metrics(g["error_pct"])
        lines.append(f"| {phase} ({pm['n']}) | {pm['mape']} | {pm['median_ape']} | {pm['max_ape']} |")
    for t in by_tp(cmp):  # tensor-parallel rows apart: the all-reduces are the model's interconnect terms
        lines.append(f"| tp {t['tp']} ({t['n']}) | {t['mape']} | {t['median_ape']} | {t['max_ape']} |")
    lines += ["", "## By phase, GPU, model and policy", "", markdown_table(by_group(cmp)), ""]
    if by_op is not None and len(by_op):
        lines += ["## By operation group (profiled steps)", "",
                  "Each profiled decode step's time by group (`kfsim measure --profile`: eager steps, GPU kernels "
                  "charged to the group whose module launched them) against the model's. `gaps` is the timed step "
                  "(these rows') less the profiled kernels, or the profiled step less them where a point was not "
                  "timed (`step`); the error is in percent of that step.", "", markdown_table(by_op), ""]
    lines += [f"![{p.stem}]({p.name})" for p in figures]
    lines += ["", "APE: absolute percentage error |predicted / measured - 1|; bias: mean signed error.", ""]
    return "\n".join(lines)


#: what write_report puts into its folder
REPORT_FILES = ("rows.csv", "report.md", "predicted_vs_measured.png", "error_vs_context.png", "error_vs_batch.png")


def write_report(cmp, engine: Engine, out_dir: str | Path, title: str, sources: list[str], by_op=None) -> Path:
    """REPORT_FILES into `out_dir`, all of them or (on a failure) none."""
    from .files import staged_folder

    with staged_folder(out_dir) as stage:
        figures = plots(cmp, stage, title)
        cmp.to_csv(stage / "rows.csv", index=False)
        (stage / "report.md").write_text(markdown(cmp, engine, title, sources, figures, by_op), encoding="utf-8")
    return Path(out_dir) / "report.md"
