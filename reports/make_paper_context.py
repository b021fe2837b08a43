"""The Keyformer paper's headline (up to 2.1x lower latency at a 50% KV cache, MPT-7B-class model, one A100 80GB,
prompt n + n generated tokens) against what kfsim predicts and what we measured.

Run from the repository root: python reports/make_paper_context.py   (writes reports/keyformer-paper/)
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kfsim.fmt import markdown_table  # noqa: E402
from kfsim.inputs import make_setup  # noqa: E402
from kfsim.policy import Policy  # noqa: E402
from kfsim.predict import predict  # noqa: E402
from measure.summarize import speedup_table  # noqa: E402

OUT = ROOT / "reports" / "keyformer-paper"
PAPER = {1024: 1.28, 2048: 1.62, 4096: 2.05}  # read off the paper's figure (../shared/reference/keyformer.md)


def request_rows():
    rows = []
    for engine in ("ideal", "default"):
        for n, paper in PAPER.items():
            for batch in (1, 8, 32):
                s = make_setup(gpu="a100", model="mpt-7b", engine=engine, policy="keyformer", kv_ratio=0.5)
                out = predict(s, batch, 2 * n - 1, prompt_len=n, gen_len=n)
                rows.append({"engine": engine, "prompt + generated": f"{n} + {n}", "batch": batch,
                             "paper": paper, "kfsim request speedup": round(float(out["request_speedup_vs_full"]), 2),
                             "kfsim last-step speedup": round(float(out["speedup_vs_full"]), 2),
                             "fits (full cache)": bool(predict(s.with_policy(Policy()), batch, 2 * n - 1,
                                                               prompt_len=n, gen_len=n)["request_fits"])})
    return pd.DataFrame(rows)


def transformers_rows():
    """The paper's setting measured through transformers (eager, batch 1, H200): the full cache's mean step over
    each request's contexts (its start, middle and end) against Keyformer's step at its fixed budget (half the
    prompt); beside it what the hf-eager engine predicts on the H200 and, not measured, on the A100."""
    from kfsim import measurements

    d = measurements.load([ROOT / "data" / "h200-hf-eager-mpt" / "rows.csv"], "hf-eager")
    full = d[d.policy == "full"].set_index("context")["step_ms"]
    kf = d[d.policy == "keyformer"].set_index("context")["step_ms"]
    rows = []
    for n, paper in PAPER.items():
        mean_full = float(full.loc[[n, 3 * n // 2, 2 * n]].mean())
        row = {"prompt + generated": f"{n} + {n}", "full cache ms (mean of 3 contexts)": round(mean_full, 2),
               "Keyformer 0.5 ms": round(float(kf.loc[n]), 2),
               "measured H200 speedup": round(mean_full / float(kf.loc[n]), 2)}
        for gpu in ("h200", "a100"):
            s = make_setup(gpu=gpu, model="mpt-7b", engine="hf-eager", policy="keyformer", kv_ratio=0.5)
            out = predict(s, 1, 2 * n - 1, prompt_len=n, gen_len=n)
            row[f"hf-eager predicted {gpu.upper()}"] = round(float(out["request_speedup_vs_full"]), 2)
        rows.append({**row, "paper (A100)": paper})
    return pd.DataFrame(rows)


def where_21x():
    """Smallest batch at which each engine predicts >= 2.1x over a request, per length."""
    rows = []
    for engine in ("ideal", "default"):
        rows += _where(engine)
    return pd.DataFrame(rows)


def _where(engine):
    rows = []
    for n in (1024, 2048, 4096, 8192):
        s = make_setup(gpu="a100", model="mpt-7b", engine=engine, policy="keyformer", kv_ratio=0.5)
        found = None
        for batch in (1, 2, 4, 8, 16, 32, 64, 128):
            sp = float(predict(s, batch, 2 * n - 1, prompt_len=n, gen_len=n)["request_speedup_vs_full"])
            if sp >= 2.1:
                found = (batch, sp)
                break
        fits = found and bool(predict(s.with_policy(Policy()), found[0], 2 * n - 1, prompt_len=n,
                                      gen_len=n)["request_fits"])
        rows.append({"engine": engine, "prompt + generated": f"{n} + {n}",
                     "smallest batch reaching 2.1x": found[0] if found else "none <= 128",
                     "speedup there": round(found[1], 2) if found else "",
                     "full cache fits on the A100 there": fits if found else ""})
    return rows


def span(values, unit: str) -> str:
    """'lo-hi' of `values` as the text gives them (two decimals for ratios, whole milliseconds)."""
    fmt = "{:.2f}" if unit == "x" else "{:.0f}"
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return (lo if lo == hi else f"{lo}-{hi}") + unit


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "kfsim", "report", "--model", "mpt-7b", "--gpus", "a100,h100,h200",
                    "--out", str(OUT)], cwd=ROOT, check=True)
    req = request_rows()
    measured = speedup_table(ROOT / "data")
    measured = measured[measured.kv_ratio == 0.5].sort_values(["gpu", "model", "batch", "context"])
    hf = transformers_rows()
    text = [
        "# The Keyformer paper's headline in context", "",
        "The paper reports up to 2.1x lower latency (and up to 2.4x generation throughput) at a 50% KV cache on one "
        "A100 80GB, for prompt n + n generated tokens (MPT-7B-class model; the batch is not stated), against a "
        "Hugging Face eager baseline. Its budget is fixed at 50% of the *prompt*, so by the end of an n + n request "
        "the cache holds a quarter of the full cache's tokens; kfsim models requests the same way.", "",
        "## What kfsim predicts for that setting (A100 80GB, MPT-7B, kv-ratio 0.5)", "",
        "`ideal` is the pure roofline (selection free, bandwidth at datasheet); `default` is the engine fitted on our "
        "H100 measurements of a plain PyTorch Keyformer (unfused scorer: tens of fp32 passes over the logits).", "",
        markdown_table(req), "",
        "## Where kfsim predicts 2.1x over a whole request", "", markdown_table(where_21x()), "",
        "## What we measured (kv-ratio 0.5, single decode steps at a fixed context, CUDA graphs)", "",
        "A single step at context C with the cache at half of C; not a whole request.", "",
        markdown_table(measured), "",
        "Reading: with an ideal, fused selection the step speedup at kv-ratio 0.5 tends to 2x once the KV cache "
        "dominates the bytes (large batch x context), and a whole n + n request gains more because its budget is "
        "fixed at half the prompt. The paper's 2.05x at 4096 + 4096 needs KV to dominate; at batch 1 on an A100 the "
        "weights (13.3 GB for MPT-7B) dominate until contexts of tens of thousands. With the plain scorer the "
        "selection costs eat most of the gain for GQA models (Llama-3-8B measured below 1x at kv-ratio 0.5); for "
        "GPT-J-6B on the H200 we measured 1.66-1.68x at kv-ratio 0.5 and 2.8x at 0.2.", "",
        "## The same setting through Hugging Face transformers (eager PyTorch, batch 1, H200)", "",
        "MPT-7B with `measure.hf.KeyformerCache` (ALiBi at each kept token's own position) against transformers' "
        "own cache, steady decode steps (each point the fastest of three rounds of 30; data/h200-hf-eager-mpt). "
        "The predicted columns are the hf-eager engine's (fitted on the H200's transformers grid, "
        "data/h200-hf-eager, at its host's speed); the A100's is a prediction, not a measurement.", "",
        markdown_table(hf), "",
        "Reading: at batch 1 transformers' eager step is bound by Python dispatching kernels (the full cache "
        f"{span(hf['full cache ms (mean of 3 contexts)'], ' ms')} whatever the context on this H200's host), so a "
        "smaller cache saves nothing, and Keyformer's scorer, dispatched from Python too, adds "
        f"{span(hf['Keyformer 0.5 ms'] - hf['full cache ms (mean of 3 contexts)'], ' ms')}: it is slower "
        f"({span(hf['measured H200 speedup'], 'x')}), not 1.3-2x faster. The hf-eager engine predicts "
        f"{span(hf['hf-eager predicted H200'], 'x')} on the H200, pricing the scorer by the operations it "
        f"dispatches, and {span(hf['hf-eager predicted A100'], 'x')} on the A100, whose full cache's GPU work is "
        "slower against the same host. The paper's gains need a step that is not host-bound (graphs or larger "
        "batches) and a KV-dominated one.",
        "",
        "Figures: [report.html](report.html) (self-contained) or [report.md](report.md).", "",
    ]
    (OUT / "headline.md").write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
