"""Regenerate the shipped default engine and the committed validation reports from the campaigns in data/.

Run from the repository root:  python reports/make_validation.py
Steps (each through the `kfsim` command, so the reports show exactly what a user can rerun):
1. engines/default.yaml    kfsim calibrate on every H100 torch-graph row, capped by the H100 microbenchmarks;
2. reports/h100-holdout/   fit on a random half of the H100 rows (seed 0), validate on the other half;
3. reports/h100-to-h200/   the default engine (fitted on H100) predicting every H200 row;
4. reports/baselines.md    the `ideal` roofline and llm-analysis (if installed) on the same rows;
5. engines/compiled.yaml and reports/compiled-h200-holdout/: the compiled engine (torch.compile glue, fused
   products and fused Triton attention) as it runs by default, fitted on data/h200-compiled-default and on a
   random half validated on the other half; and reports/compiled-h100-holdout/, reports/compiled-h100-to-h200/:
   its first kernel (data/*-compiled/, before the kernel options became its only path), fitted on the H100 and
   checked on a held-out half and on the H200 (the cross-GPU check; that engine stays in the report folder);
then reports/validation-summary.json with every figure quoted in the README.
6. engines/compiled-options.yaml and reports/compiled-options-h200-holdout/: the compiled engine with every opt-in
   kernel option on (OPTIONS_GRID, measured on the H200 only): fitted on every row, and on a random half
   validated on the other half (`--only compiled-options` runs this step alone).
7. engines/hf-eager.yaml: Hugging Face transformers in eager PyTorch (data/h200-hf-eager), fitted with
   --host-dispatch, the operations counted per model (data/hf-host-ops) and the KV passes counted per model
   (data/hf-kv-passes); on the H200's and the H100's grids (data/h100-sxm-hf-eager) reports/hf-eager-GPU-holdout/
   (a random half validated on the other) and reports/hf-eager-GPU-unseen-models/ (fitted on GPT-J-6B and
   Llama-3-8B, validated on Mistral-7B and MPT-7B); reports/hf-eager-h200-to-h100/: the shipped engine on the
   H100 rows; reports/hf-eager-h100-slow-host/: on the H100's Keyformer rows of a slower host; and
   reports/hf-eager-h100-prefill/: on the H100's prefill rows (data/h100-sxm-hf-prefill), fitted beside the
   H200's decode rows with the prefill attention counted per model (data/hf-prefill-counts), and
   reports/hf-eager-h100-prefill-holdout/ and -unseen-models/: the same two checks on them; the shipped engine's
   caveat quotes its measured miss on short Keyformer prompts (`--only hf-eager`).
   engines/hf-compiled.yaml: transformers' static cache under torch.compile (data/h200-hf-compiled), fitted with
   --kv-traffic on the rows whose steps replay CUDA graphs (reports/hf-compiled-GPU-rows/: all but Mistral-7B's
   full cache); reports/hf-compiled-h200-to-h100/: the H100's replayed rows (data/h100-sxm-hf-compiled, Keyformer
   included) predicted by it; reports/hf-compiled-h100-holdout/: a random half of those validated on the other
   (each GPU with enough replayed rows); reports/hf-compiled-GPU-sliding-window/: Mistral-7B's full cache
   (`--only hf-compiled`).
8. reports/plain-h200-unseen-models/ and reports/plain-h200-models-holdout/: the plain decoder on five
   architectures (data/h200-plain-models; MPT-7B's full cache from data/h200-mpt-bias): fitted on GPT-J-6B and Llama-3-8B, validated on MPT-7B (ALiBi),
   Mistral-7B (sliding window) and Cerebras-GPT-6.7B (learned positions); and a random half validated on the
   other half (`--only plain-models`); and reports/plain-h200-unseen-models-profiled/: the first of these with
   GPT-J-6B's profiled steps fitted beside the rows (`kfsim calibrate --profile`).
9. reports/breakdown-h200/ (the plain decoder, default engine) and reports/breakdown-hf-eager-h200/ (transformers,
   hf-eager engine): data/h200-profile's steps by operation group against the model's; and
   reports/compiled-h200-mpt/: the compiled engine (fitted on GPT-J-6B and Llama-3-8B) predicting MPT-7B, whose
   ALiBi its fused kernel adds (data/h200-compiled-mpt) (`--only breakdown`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kfsim import measurements  # noqa: E402
from kfsim.engine import Caveat, get_engine  # noqa: E402
from kfsim.fmt import markdown_table  # noqa: E402
from kfsim.validate import compare, metrics  # noqa: E402

DATA = ROOT / "data"
REPORTS = ROOT / "reports"
MEASURED = "torch-graph"
#: the models every "unseen models" check fits on; the others are predicted
FITTED_MODELS = ["gpt-j-6b", "llama-3-8b"]


def kfsim(*args: str) -> str:
    cmd = [sys.executable, "-m", "kfsim", *args]
    print("$ kfsim " + " ".join(args), flush=True)
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr}")
    return out.stdout


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def llm_analysis_ms(rows: pd.DataFrame) -> np.ndarray:
    """llm-analysis's decode (or prefill) latency for each row; NaN where it cannot say. Keyformer rows are given
    the kept tokens as their sequence length: the closest it can come to a reduced cache."""
    try:
        from llm_analysis import config as lc
        from llm_analysis.analysis import infer
    except ImportError:
        return np.full(len(rows), np.nan)
    lc.gpu_configs.setdefault("h200-sxm-141gb", lc.GPUConfig(
        name="h200-sxm-141gb", mem_per_GPU_in_GB=141, hbm_bandwidth_in_GB_per_sec=4800,
        intra_node_bandwidth_in_GB_per_sec=450, intra_node_min_message_latency=8e-06, peak_fp16_TFLOPS=989))
    gpus = {"h100-sxm": "h100-sxm-80gb", "h200": "h200-sxm-141gb"}
    models = {  # llm-analysis's own GPT-J config; Llama-3-8B written in its schema (it has no gated-FFN flag)
        "gpt-j-6b": dict(name="gptj-long", num_layers=28, n_head=16, hidden_dim=4096, vocab_size=50400,
                         max_seq_len=1 << 20, ffn_embed_dim=16384, model_type="gptj"),
        "llama-3-8b": dict(name="llama3-8b", num_layers=32, n_head=32, num_key_value_heads=8, hidden_dim=4096,
                           vocab_size=128256, max_seq_len=1 << 20, ffn_embed_dim=14336, expansion_ratio=3.5,
                           model_type="llama"),
    }
    out = []
    for r in rows.itertuples():
        cfg = models.get(r.model)
        if cfg is None or r.gpu not in gpus:
            out.append(np.nan)
            continue
        lc.model_configs[cfg["name"]] = lc.ModelConfig(**cfg)
        seq = int(r.cached_tokens) if r.phase == "decode" and r.policy != "full" else int(r.context)
        res = infer(model_name=cfg["name"], gpu_name=gpus[r.gpu], dtype_name="w16a16e16", log_level="ERROR",
                    batch_size_per_gpu=int(r.batch), seq_len=seq, num_tokens_to_generate=1)
        out.append(1e3 * (res["prefill_latency"] if r.phase == "prefill" else res["decode_latency"]))
    return np.array(out)


#: llm-analysis's predictions, written where it is installed and read where it is not (so that the reports come out
#: the same on any machine)
LLM_ANALYSIS_CACHE = REPORTS / "llm-analysis-predictions.csv"
POINT = ["gpu", "model", "phase", "batch", "context", "policy", "kv_ratio"]


def llm_analysis_cached(rows: pd.DataFrame, label: str) -> np.ndarray:
    """llm_analysis_ms for `rows`, saved under `label` in LLM_ANALYSIS_CACHE; without llm-analysis installed,
    the saved figures (and a line saying so)."""
    try:
        import llm_analysis  # noqa: F401
    except ImportError:
        saved = pd.read_csv(LLM_ANALYSIS_CACHE)
        saved = saved[saved["rows"] == label].drop(columns="rows")
        print(f"llm-analysis is not installed (pip install -e '.[compare]'): its {label} predictions are read from "
              f"{rel(LLM_ANALYSIS_CACHE)}", flush=True)
        return rows[POINT].merge(saved, on=POINT, how="left")["llm_analysis_ms"].to_numpy()
    ms = llm_analysis_ms(rows)
    new = rows[POINT].assign(rows=label, llm_analysis_ms=ms)
    old = pd.read_csv(LLM_ANALYSIS_CACHE) if LLM_ANALYSIS_CACHE.exists() else new.iloc[:0]
    pd.concat([old[old["rows"] != label], new]).to_csv(LLM_ANALYSIS_CACHE, index=False)
    return ms


def summary_row(name: str, cmp: pd.DataFrame, col: str = "error_pct") -> dict:
    row = {"rows": name}
    for phase in ("decode", "prefill"):
        m = metrics(cmp.loc[cmp["phase"] == phase, col].dropna())
        row.update({f"{phase}_mape": m["mape"], f"{phase}_max": m["max_ape"], f"{phase}_n": m["n"]})
    return row


def rows_of(path: Path, measured: str, **kw) -> pd.DataFrame:
    """The `measured` engine's rows of a campaign file, without measurements.load's source column."""
    return measurements.load([path], measured, **kw).drop(columns="source")


def split_half(rows: pd.DataFrame, seed: int = 0) -> np.ndarray:
    """A mask choosing half of each phase's rows (so that both phases can be fitted)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(rows), dtype=bool)
    for _, idx in rows.groupby("phase").groups.items():
        idx = rng.permutation(np.asarray(idx))
        mask[idx[: (len(idx) + 1) // 2]] = True
    return mask


#: what each measured stack is, as calibrate's flags: the compiled decoder scores Keyformer inside attention and
#: runs fused Triton GEMVs at batch 1; transformers in eager PyTorch dispatches every operation from Python
#: (data/hf-host-ops counts them per model); transformers' static cache under torch.compile replays CUDA graphs
#: but attends its whole cache, grouped heads expanded first
STACK_FLAGS = {"compiled": ["--fused-scorer", "--matvec-max-batch", "1"],
               "hf-eager": ["--host-dispatch", "--host-ops", "data/hf-host-ops/ops.csv", "--kv-passes",
                            "data/hf-kv-passes/passes.csv", "--prefill-counts", "data/hf-prefill-counts/counts.csv"],
               "hf-compiled": ["--kv-traffic"]}


def fit_and_hold_out(measured: str, name: str, grid: Path, gpu: str, micro: Path, hold: Path, what: str,
                     engine: Path | None = None, engine_rows: Path | None = None) -> Path:
    """`engine` (default engines/NAME.yaml) fitted on every `measured` row of `grid` (measured on `gpu`; of
    `engine_rows` where given), and into `hold` a fit on a random half of `grid` validated on the other half;
    returns `engine`."""
    engine = engine or ROOT / "engines" / f"{name}.yaml"
    kfsim("calibrate", rel(engine_rows or grid), "--measured-engine", measured, "--microbench", rel(micro),
          "--name", name, "--out", rel(engine), *STACK_FLAGS.get(measured, []))
    hold_out(measured, name, grid, gpu, micro, hold, what)
    return engine


def hold_out(measured: str, name: str, grid: Path | pd.DataFrame, gpu: str, micro: Path, hold: Path,
             what: str) -> None:
    """Into `hold`: an engine fitted on a random half of `grid`'s `measured` rows (a rows file, or the rows
    themselves), validated on the other half."""
    hold.mkdir(parents=True, exist_ok=True)
    rows = grid if isinstance(grid, pd.DataFrame) else rows_of(grid, measured)
    rows = rows.reset_index(drop=True)
    mask = split_half(rows)
    rows[mask].to_csv(hold / "fit.csv", index=False)
    rows[~mask].to_csv(hold / "test.csv", index=False)
    kfsim("calibrate", rel(hold / "fit.csv"), "--microbench", rel(micro), "--name", f"{name}-{gpu.lower()}-half",
          "--out", rel(hold / "engine.yaml"), *STACK_FLAGS.get(measured, []))
    kfsim("validate", rel(hold / "test.csv"), "--engine", rel(hold / "engine.yaml"), "--out", rel(hold),
          "--title", f"{what}: held-out half of the {gpu} rows (engine fitted on the other half)")


def fit_and_check(measured: str, name: str, h100: Path, h200: Path, micro: Path, hold: Path, cross: Path,
                  what: str, engine: Path | None = None) -> Path:
    """Steps 1-3 for one measured engine: `engine` (default the shipped engines/NAME.yaml) from every H100 row, a
    fit on a random half validated on the other half, and `engine` validated on every H200 row."""
    engine = fit_and_hold_out(measured, name, h100, "H100", micro, hold, what, engine)
    kfsim("validate", rel(h200), "--measured-engine", measured, "--engine", rel(engine),
          "--out", rel(cross), "--title", f"{what}: H200 rows predicted by the engine fitted on H100")
    return engine


#: the compiled decoder's grid with the kernels it runs by default (H200, 2026-12-04)
DEFAULT_GRID = DATA / "h200-compiled-default" / "rows.csv"


def compiled_engine(micro: Path) -> list[dict]:
    """Fit the shipped engine of the compiled decoder on its default kernels (H200; held-out half), and check its
    first kernel's engine across GPUs (fitted on the H100, validated on the H200): decode rows only."""
    shipped_hold = REPORTS / "compiled-h200-holdout"
    fit_and_hold_out("compiled", "compiled", DEFAULT_GRID, "H200", DATA / "h200-plain" / "microbench.csv",
                     shipped_hold, "Compiled engine, default kernels")
    h100, h200 = DATA / "h100-sxm-compiled" / "rows.csv", DATA / "h200-compiled" / "rows.csv"
    hold = REPORTS / "compiled-h100-holdout"
    first = fit_and_check("compiled", "compiled-first-kernel", h100, h200, micro, hold,
                          REPORTS / "compiled-h100-to-h200", "Compiled engine, first kernel",
                          engine=REPORTS / "compiled-h100-to-h200" / "engine.yaml")
    out = []
    for label, df, engine in (("compiled: H200 held-out half", measurements.load([shipped_hold / "test.csv"]),
                               shipped_hold / "engine.yaml"),
                              ("compiled, first kernel: H100 held-out half", measurements.load([hold / "test.csv"]),
                               hold / "engine.yaml"),
                              ("compiled, first kernel: H200 (fitted on H100)", measurements.load([h200], "compiled"),
                               first)):
        for name, eng in (("kfsim fitted engine", str(engine)), ("kfsim ideal roofline", "ideal")):
            cmp = compare(df, get_engine(eng))
            out.append({"rows": label, "predictor": name, **{k: v for k, v in summary_row(name, cmp).items()
                                                             if k != "rows"}})
        ours = compare(df, get_engine(str(engine)))
        for (model, policy), g in ours.groupby(["model", "policy"]):
            out.append({"rows": label, "predictor": f"kfsim fitted: {model} {policy} decode",
                        "decode_mape": metrics(g["error_pct"])["mape"], "decode_max": metrics(g["error_pct"])["max_ape"],
                        "decode_n": len(g)})
    return out


#: the compiled decoder's grid with every opt-in option of measure/kernel_options.py on (H200, 2026-12-04)
OPTIONS_GRID = DATA / "h200-compiled-options" / "rows.csv"


def compiled_options_engine() -> None:
    """Step 6: the options grid has no H100 counterpart yet, so its engine is checked on a held-out half of the
    same GPU only (not yet across GPUs)."""
    fit_and_hold_out("compiled", "compiled-options", OPTIONS_GRID, "H200", DATA / "h200-plain" / "microbench.csv",
                     REPORTS / "compiled-options-h200-holdout", "Compiled engine, every kernel option on")


def two_models(rows: pd.DataFrame, micro: Path, out: Path, name: str, title: str, flags=()) -> None:
    """Into `out`: an engine fitted on the GPT-J-6B and Llama-3-8B rows, validated on every other model's."""
    seen = rows["model"].isin(FITTED_MODELS)
    out.mkdir(parents=True, exist_ok=True)
    rows[seen].to_csv(out / "fit.csv", index=False)
    rows[~seen].to_csv(out / "test.csv", index=False)
    kfsim("calibrate", rel(out / "fit.csv"), "--microbench", rel(micro), "--name", name,
          "--out", rel(out / "engine.yaml"), *flags)
    kfsim("validate", rel(out / "test.csv"), "--engine", rel(out / "engine.yaml"), "--out", rel(out),
          "--title", title)


def hf_eager_engine() -> None:
    """Step 7: transformers in eager PyTorch, fitted with the host's cost per counted operation, each model's
    counted KV passes and its counted prefill attention: the shipped engine on every H200 decode row
    (data/h200-hf-eager) and the H100's prefill rows (data/h100-sxm-hf-prefill; the H200 has none); on each GPU's
    grid a random half validated on the other and Mistral-7B and MPT-7B predicted by an engine fitted on GPT-J-6B
    and Llama-3-8B, and the same two checks on the prefill rows (prefill_checks); the shipped engine on the H100's
    rows (data/h100-sxm-hf-eager), on the H100's Keyformer rows of today's cache from two other hosts (its host
    scaling) and on the prefill rows it was fitted on."""
    what = "Hugging Face transformers, eager"
    prefill = REPORTS / "hf-eager-h100-prefill"
    prefill.mkdir(parents=True, exist_ok=True)
    rows = rows_of(DATA / "h100-sxm-hf-prefill" / "rows.csv", "hf-eager", phase="prefill").reset_index(drop=True)
    rows.to_csv(prefill / "fit.csv", index=False)
    hf_engine("hf-eager", what, "Mistral-7B and MPT-7B", home="h200", checked=("h200", "h100"),
              prefill=prefill / "fit.csv")
    shipped = ROOT / "engines" / "hf-eager.yaml"
    engine = rel(shipped)
    for data, report, host in (("h100-sxm-hf-eager-keyformer", "hf-eager-h100-keyformer", "another host"),
                               ("h100-sxm-hf-eager-slow-host", "hf-eager-h100-slow-host", "a slower host")):
        rows_csv = DATA / data / "rows.csv"
        launch = rows_of(rows_csv, "hf-eager")["host_launch_us"]
        kfsim("validate", rel(rows_csv), "--engine", engine, "--out", rel(REPORTS / report), "--title",
              f"{what}: the H100's Keyformer rows, today's cache, on {host} (a CUDA launch {launch.min():.1f}-"
              f"{launch.max():.1f} us against the {get_engine(str(shipped)).host_launch_us:.1f} the engine was fitted "
              f"at), predicted by the shipped engine")
    kfsim("validate", rel(prefill / "fit.csv"), "--engine", engine, "--out", rel(prefill), "--title",
          f"{what}: prefill on the H100, by the shipped engine (fitted on these rows beside the H200's decode rows)")
    dataclasses.replace(get_engine(str(shipped)),
                        caveats=(short_prompt_caveat(pd.read_csv(prefill / "rows.csv")),)).write(shipped)
    prefill_checks(rows, what)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: a DataFrame has no truth value to compare by
class Miss:
    """A caveat's measured figures, from validated rows (step_ms, predicted_ms, error_pct, model, gpu)."""

    rows: pd.DataFrame

    @property
    def took(self) -> str:
        return f"{self.rows['step_ms'].min():.0f}-{self.rows['step_ms'].max():.0f} ms"

    @property
    def ratio(self) -> str:
        r = self.rows["step_ms"] / self.rows["predicted_ms"]
        return f"{r.min():.1f}-{r.max():.1f}x"

    @property
    def mape(self) -> str:
        return f"MAPE {self.rows['error_pct'].abs().mean():.0f} %"

    @property
    def n(self) -> int:
        return len(self.rows)

    def names(self, column: str) -> str:
        return ", ".join(sorted(self.rows[column].unique()))


#: the longest prompt of the measured short-prompt Keyformer prefills (data/h100-sxm-hf-prefill: 128 and 512)
SHORT_PROMPT = 512


def short_prompt_caveat(rows: pd.DataFrame) -> Caveat:
    """hf-eager's measured miss on a Keyformer cache's short prefill (`rows`: the shipped engine's validated
    prefill rows, with predicted_ms): up to twice the host time its counted operations price, since prefill's
    operations cost the host more each than decode's (lab/data/hf/h100-prefill-host.txt), said beside every such
    time to first token."""
    m = Miss(rows[(rows["policy"] == "keyformer") & (rows["context"] <= SHORT_PROMPT)])
    return Caveat(
        note=f"a Keyformer cache's prefill of a prompt of at most {SHORT_PROMPT} tokens took {m.took}, {m.ratio} "
             f"this engine's time to first token ({m.mape}, {m.n} points of {m.names('model')} on {m.names('gpu')}; "
             f"reports/hf-eager-h100-prefill/): the host spends more there than its counted operations",
        policies=("keyformer",), max_prompt=SHORT_PROMPT)


def prefill_checks(rows: pd.DataFrame, what: str) -> None:
    """The H100's transformers prefill rows, predicted where not fitted: a random half by an engine fitted on the
    other (reports/hf-eager-h100-prefill-holdout/), and Mistral-7B and MPT-7B by one fitted on GPT-J-6B and
    Llama-3-8B (reports/hf-eager-h100-prefill-unseen-models/); each fitted beside every H200 decode row, whose
    terms the prefill fit starts from."""
    decode = rel(hf_folder("hf-eager", "h200") / "rows.csv")
    seen = rows["model"].isin(FITTED_MODELS)
    for folder, mask, title in (("holdout", split_half(rows), "held-out half (engine fitted on the other half)"),
                                ("unseen-models", seen, "Mistral-7B and MPT-7B predicted by an engine fitted on "
                                                        "GPT-J-6B and Llama-3-8B")):
        out = REPORTS / f"hf-eager-h100-prefill-{folder}"
        out.mkdir(parents=True, exist_ok=True)
        rows[mask].to_csv(out / "fit.csv", index=False)
        rows[~mask].to_csv(out / "test.csv", index=False)
        kfsim("calibrate", decode, rel(out / "fit.csv"), "--measured-engine", "hf-eager", "--microbench",
              rel(hf_micro("hf-eager", "h200")), "--name", f"hf-eager-prefill-{folder}", "--out",
              rel(out / "engine.yaml"), *STACK_FLAGS["hf-eager"])
        kfsim("validate", rel(out / "test.csv"), "--engine", rel(out / "engine.yaml"), "--out", rel(out),
              "--title", f"{what}: H100 prefill, {title}")


#: the fewest rows in a fitted half: twice the nine parameters of a full cache's --kv-traffic fit (calibrate
#: refuses a half too small for the parameters its rows bring)
MIN_HALF_ROWS = 18


def hf_compiled_engine() -> None:
    """Step 7b: transformers' static cache under torch.compile, fitted with its KV traffic and no host dispatch on
    the rows whose steps replay a CUDA graph: every row but Mistral-7B's full cache, which transformers 5.17 keeps in
    a sliding-window layer whose length is a Python int, so that no graph is recorded (docs/validation.md); those
    are predicted apart (reports/hf-compiled-GPU-sliding-window/). Checked as hf-eager is, on each GPU with enough
    replayed rows for a half to fit the engine. The compiled Keyformer cache is measured on the H100 only (no H200
    started for it): the shipped engine borrows those rows, so that its Keyformer terms are measured ones, and is
    checked across GPUs on the H100's full-cache rows."""
    what = "Hugging Face transformers, compiled"
    rows, graphless = {}, {}
    for gpu in HF_GRIDS:
        every = hf_rows("hf-compiled", gpu)
        apart = (every["model"] == "mistral-7b") & (every["policy"] == "full")
        rows[gpu], graphless[gpu] = every[~apart], every[apart]
    checked = tuple(g for g in HF_GRIDS if len(rows[g]) >= 2 * MIN_HALF_ROWS)
    hf_engine("hf-compiled", what, "Mistral-7B's and MPT-7B's Keyformer caches", home="h200", checked=checked,
              rows=rows, borrowed=unmeasured_policies(rows["h100"], rows["h200"]))
    engine, predicted = ROOT / "engines" / "hf-compiled.yaml", []
    for gpu, df in graphless.items():
        out = REPORTS / f"hf-compiled-{gpu}-sliding-window"
        out.mkdir(parents=True, exist_ok=True)
        df.to_csv(out / "test.csv", index=False)
        kfsim("validate", rel(out / "test.csv"), "--engine", rel(engine),
              "--out", rel(out), "--title", f"{what}: Mistral-7B's full cache, whose steps replay no CUDA graph "
              f"({gpu.upper()}), predicted by the shipped engine")
        predicted.append(pd.read_csv(out / "rows.csv"))
    dataclasses.replace(get_engine(str(engine)), caveats=(graphless_caveat(pd.concat(predicted)),)).write(engine)


def unmeasured_policies(other: pd.DataFrame, home: pd.DataFrame) -> pd.DataFrame | None:
    """`other`'s rows of each model and KV policy that `home` has no row of (None: none), for the shipped engine
    to borrow, so that every term it ships is fitted on some measurement."""
    measured = set(zip(home["model"], home["policy"]))
    lent = other[[m not in measured for m in zip(other["model"], other["policy"])]]
    return lent if len(lent) else None


def graphless_caveat(rows: pd.DataFrame) -> Caveat:
    """hf-compiled's measured miss on a sliding-window model's full cache (`rows`: validated, with predicted_ms),
    said beside every prediction it covers: its terms describe replayed CUDA graphs, and transformers 5.17 records
    none there."""
    m = Miss(rows)
    return Caveat(
        note=f"transformers 5.17 records no CUDA graph for a sliding-window model's full static cache, and this "
             f"engine describes replayed graphs: {m.names('model')} took {m.took} a step there, unevenly, "
             f"{m.ratio} this engine's prediction ({m.mape}, {m.n} points on {m.names('gpu')}; "
             f"reports/hf-compiled-*-sliding-window/)",
        policies=("full",), sliding_window=True)


#: each GPU's campaign folder of a transformers stack
HF_GRIDS = {"h100": "data/h100-sxm-{stack}", "h200": "data/h200-{stack}"}


def hf_folder(stack: str, gpu: str) -> Path:
    return ROOT / HF_GRIDS[gpu].format(stack=stack)


def hf_micro(stack: str, gpu: str) -> Path:
    """The stack's own lease's microbenchmark on `gpu` where it has one (its copy rates), else the plain one's."""
    folder = hf_folder(stack, gpu)
    plain = DATA / f"{folder.name.rsplit('-' + stack, 1)[0]}-plain" / "microbench.csv"
    return folder / "microbench.csv" if (folder / "microbench.csv").exists() else plain


def hf_rows(stack: str, gpu: str) -> pd.DataFrame:
    return rows_of(hf_folder(stack, gpu) / "rows.csv", stack)


def hf_engine(stack: str, what: str, unseen: str, home: str, checked: tuple[str, ...],
              rows: dict[str, pd.DataFrame] | None = None, borrowed: pd.DataFrame | None = None,
              prefill: Path | None = None) -> None:
    """engines/STACK.yaml fitted on `home`'s rows, and checks: on each `checked` GPU a random half validated on the
    other and `unseen` models predicted by an engine fitted on GPT-J-6B and Llama-3-8B; the shipped engine on the
    other GPU's rows. `rows`: each GPU's rows where not every row of its campaign (the home's then fitted from
    reports/STACK-HOME-rows/). `borrowed`: rows of the other GPU fitted with the home's (what the home has not
    measured; reports/STACK-OTHER-borrowed/), and left out of the check on that GPU. `prefill`: prefill rows
    (of a campaign of their own) fitted beside the home's decode rows."""
    micro = functools.partial(hf_micro, stack)
    rows = rows or {}
    other = next(g for g in HF_GRIDS if g != home)
    files = {gpu: hf_folder(stack, gpu) / "rows.csv" for gpu in HF_GRIDS}
    for gpu, df in rows.items():
        files[gpu] = REPORTS / f"{stack}-{gpu}-rows" / "rows.csv"
        files[gpu].parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(files[gpu], index=False)
    fit, micros = [rel(files[home])], ["--microbench", rel(micro(home))]
    lent = REPORTS / f"{stack}-{other}-borrowed" / "rows.csv"
    if borrowed is None:
        shutil.rmtree(lent.parent, ignore_errors=True)  # a report of rows no longer borrowed would mislead
        (REPORTS / f"{stack}-{home}-to-{other}" / "test.csv").unlink(missing_ok=True)
    else:
        lent.parent.mkdir(parents=True, exist_ok=True)
        borrowed.to_csv(lent, index=False)
        fit.append(rel(lent))
        micros += ["--microbench", rel(micro(other))]
        rest = (rows[other] if other in rows else hf_rows(stack, other)).drop(borrowed.index)
        files[other] = REPORTS / f"{stack}-{home}-to-{other}" / "test.csv"
        files[other].parent.mkdir(parents=True, exist_ok=True)
        rest.to_csv(files[other], index=False)
    if prefill is not None:
        fit.append(rel(prefill))
    engine = ROOT / "engines" / f"{stack}.yaml"
    kfsim("calibrate", *fit, "--measured-engine", stack, *micros, "--name", stack, "--out", rel(engine),
          *STACK_FLAGS[stack])
    for gpu in checked:
        df = rows[gpu] if gpu in rows else hf_rows(stack, gpu)
        hold_out(stack, stack, df, gpu.upper(), micro(gpu), REPORTS / f"{stack}-{gpu}-holdout", what)
        if df["model"].isin(FITTED_MODELS).all():
            continue
        two_models(df, micro(gpu), REPORTS / f"{stack}-{gpu}-unseen-models", f"{stack}-{gpu}-two-models",
                   f"{what}: {unseen} predicted by an engine fitted on GPT-J-6B and Llama-3-8B ({gpu.upper()})",
                   STACK_FLAGS[stack])
    kfsim("validate", rel(files[other]), "--measured-engine", stack, "--engine", rel(engine),
          "--out", rel(REPORTS / f"{stack}-{home}-to-{other}"),
          "--title", f"{what}: {other.upper()} rows predicted by the engine fitted on the {home.upper()}")


def plain_models() -> None:
    """Step 8: models the engine never saw. The fitted engines stay in the report folders (not shipped)."""
    grid, micro = DATA / "h200-plain-models" / "rows.csv", DATA / "h200-plain" / "microbench.csv"
    rows = rows_of(grid, MEASURED)
    # MPT-7B's full cache as the decoder now runs it (ALiBi bias rows in cuDNN attention, data/h200-mpt-bias), in
    # place of the grid's position-column rows; its Keyformer rows did not change
    mpt = rows_of(DATA / "h200-mpt-bias" / "rows.csv", MEASURED, phase="decode")
    rows = pd.concat([rows[~((rows["model"] == "mpt-7b") & (rows["policy"] == "full"))], mpt], ignore_index=True)
    unseen = REPORTS / "plain-h200-unseen-models"
    two_models(rows, micro, unseen, "plain-h200-two-models", "Plain decoder: MPT-7B, Mistral-7B and "
               "Cerebras-GPT-6.7B predicted by an engine fitted on GPT-J-6B and Llama-3-8B (H200)")
    # the same, with the fitted models' profiled steps of this decoder (data/h200-profile: GPT-J-6B's) fitted
    # beside the rows: rotary kernels apart from the layers' fixed cost
    profiled = REPORTS / "plain-h200-unseen-models-profiled"
    profiled.mkdir(parents=True, exist_ok=True)
    prof = pd.read_csv(DATA / "h200-profile" / "rows-profile.csv")
    fitted = prof["model"].isin(FITTED_MODELS) & (prof["engine"] == MEASURED)
    prof[fitted].to_csv(profiled / "profile.csv", index=False)
    kfsim("calibrate", rel(unseen / "fit.csv"), "--microbench", rel(micro), "--profile", rel(profiled / "profile.csv"),
          "--name", "plain-h200-two-models-profiled", "--out", rel(profiled / "engine.yaml"))
    kfsim("validate", rel(unseen / "test.csv"), "--engine", rel(profiled / "engine.yaml"), "--out", rel(profiled),
          "--title", "Plain decoder: MPT-7B, Mistral-7B and Cerebras-GPT-6.7B predicted by an engine fitted on "
          "GPT-J-6B and Llama-3-8B plus GPT-J-6B's profiled steps (H200)")
    hold = REPORTS / "plain-h200-models-holdout"
    hold.mkdir(parents=True, exist_ok=True)
    mask = split_half(rows)
    rows[mask].to_csv(hold / "fit.csv", index=False)
    rows[~mask].to_csv(hold / "test.csv", index=False)
    kfsim("calibrate", rel(hold / "fit.csv"), "--microbench", rel(micro), "--name", "plain-h200-models-half",
          "--out", rel(hold / "engine.yaml"))
    kfsim("validate", rel(hold / "test.csv"), "--engine", rel(hold / "engine.yaml"), "--out", rel(hold),
          "--title", "Plain decoder, five architectures: held-out half of the H200 rows")


def breakdown() -> None:
    """Step 9: where the model is wrong, by operation group, for one point of each backend profiled."""
    prof = DATA / "h200-profile"
    profiled = set(pd.read_csv(prof / "rows-profile.csv")["engine"])
    for measured, engine, out, what in (("torch-graph", "default", "breakdown-h200", "plain decoder in CUDA graphs"),
                                        ("hf-eager", "hf-eager", "breakdown-hf-eager-h200", "transformers, eager")):
        if measured not in profiled:
            print(f"no {measured} step profiled in {rel(prof)}: no {out} report")
            continue
        kfsim("validate", rel(prof / "rows.csv"), "--measured-engine", measured, "--engine", engine,
              "--profile", rel(prof / "rows-profile.csv"), "--out", rel(REPORTS / out),
              "--title", f"A decode step by operation group, {what} (H200, engine {engine})")
    kfsim("validate", rel(DATA / "h200-compiled-mpt" / "rows.csv"), "--measured-engine", "compiled", "--engine",
          "compiled", "--out", rel(REPORTS / "compiled-h200-mpt"),
          "--title", "Compiled engine (fitted on GPT-J-6B and Llama-3-8B) predicting MPT-7B, ALiBi in its kernel (H200)")


ONLY = {"breakdown": breakdown, "plain-models": plain_models, "compiled-options": compiled_options_engine,
        "hf-eager": hf_eager_engine, "hf-compiled": hf_compiled_engine}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--only" and sys.argv[2] in ONLY:
        ONLY[sys.argv[2]]()
        return
    if sys.argv[1:]:
        sys.exit(f"usage: python reports/make_validation.py [--only {'|'.join(ONLY)}]")
    h100, h200 = DATA / "h100-sxm-plain" / "rows.csv", DATA / "h200-plain" / "rows.csv"
    micro = DATA / "h100-sxm-plain" / "microbench.csv"
    hold = REPORTS / "h100-holdout"
    fit_and_check(MEASURED, "default", h100, h200, micro, hold, REPORTS / "h100-to-h200", "Plain decoder")
    # 4. baselines on the same rows
    test = measurements.load([hold / "test.csv"])
    cross_rows = measurements.load([h200], MEASURED)
    table = []
    for label, df, engine in (("H100 held-out half", test, hold / "engine.yaml"),
                              ("H200 (fitted on H100)", cross_rows, ROOT / "engines" / "default.yaml")):
        ours = compare(df, get_engine(str(engine)))
        ideal = compare(df, get_engine("ideal"))
        lla = df.copy()
        lla["predicted_ms"] = llm_analysis_cached(df, label)
        lla["error_pct"] = 100 * (lla["predicted_ms"] / lla["step_ms"] - 1)
        for name, cmp in (("kfsim fitted engine", ours), ("kfsim ideal roofline", ideal),
                          ("llm-analysis 0.2.2 (defaults)", lla)):
            table.append({"rows": label, "predictor": name, **{k: v for k, v in summary_row(name, cmp).items()
                                                                 if k != "rows"}})
        for policy in ("full", "keyformer"):
            sub = ours[(ours["phase"] == "decode") & (ours["policy"] == policy)]
            for model, g in sub.groupby("model"):
                table.append({"rows": label, "predictor": f"kfsim fitted: {model} {policy} decode",
                              "decode_mape": metrics(g["error_pct"])["mape"],
                              "decode_max": metrics(g["error_pct"])["max_ape"], "decode_n": len(g)})
    table += compiled_engine(micro)
    breakdown()
    summary = pd.DataFrame(table)
    (REPORTS / "baselines.md").write_text(
        "# kfsim against baselines on the same measured rows\n\nMAPE and worst absolute error in percent; n rows. "
        "Regenerate with `python reports/make_validation.py`.\n\n" + markdown_table(summary.astype(object).where(summary.notna(), "")) + "\n\n"
        "llm-analysis has no KV-cache reduction: Keyformer rows are given the kept tokens as the sequence length. "
        "It also has no gated (SwiGLU) FFN, so it counts two FFN matrices for Llama-3-8B instead of three.\n")
    (REPORTS / "validation-summary.json").write_text(json.dumps(summary.to_dict(orient="records"), indent=1))
    print(markdown_table(summary.astype(object).where(summary.notna(), "")))
    compiled_options_engine()
    hf_eager_engine()
    hf_compiled_engine()
    plain_models()


if __name__ == "__main__":
    main()
