"""The README's figures are claims: its worked example and its calibration table must match what the code and the
committed reports give today (a refit or a model change that moves them fails here, not in a reader's hands)."""
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from kfsim.cli import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_worked_example_prints_what_the_readme_shows():
    block = re.search(r"^```\n\$ kfsim (predict [^\n]*)\n(.*?)^```", README, re.S | re.M)
    assert block, "README has no '$ kfsim predict ...' example block"
    r = CliRunner().invoke(cli, block.group(1).split())
    assert r.exit_code == 0, r.output
    assert r.output.strip() == block.group(2).strip()


def _baselines() -> dict[tuple[str, str], tuple[float, float, int]]:
    """(rows, predictor) -> columns of reports/baselines.md."""
    out = {}
    for line in (ROOT / "reports" / "baselines.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[0] not in ("rows", "---"):
            out[(cells[0], cells[1])] = cells[2:]
    return out


README_ROWS = {  # README table row -> (baselines.md rows, phase)
    "H100 held-out half, decode": ("H100 held-out half", 0),
    "H200 predicted by the H100 fit, decode": ("H200 (fitted on H100)", 0),
    "H100 held-out half, prefill": ("H100 held-out half", 3),
    "H200 predicted by the H100 fit, prefill": ("H200 (fitted on H100)", 3),
}
PREDICTORS = ["kfsim fitted engine", "kfsim ideal roofline", "llm-analysis 0.2.2 (defaults)"]


@pytest.mark.parametrize("label", README_ROWS)
def test_calibration_table_matches_reports_baselines(label):
    line = re.search(r"^\| " + re.escape(label) + r" \((\d+)( rows)?\) \|(.*)\|$", README, re.M)
    assert line, f"README has no row {label!r}"
    rows, col = README_ROWS[label]
    base = _baselines()
    cells = [c.replace("*", "").strip() for c in line.group(3).split("|")]
    assert len(cells) == len(PREDICTORS)
    for predictor, cell in zip(PREDICTORS, cells):
        mape, worst, n = base[(rows, predictor)][col:col + 3]
        assert int(line.group(1)) == int(n), (label, predictor)
        assert cell == f"{float(mape):.1f} / {float(worst):.1f}", (label, predictor, mape, worst)


def test_by_model_figures_match_reports_baselines():
    text = re.search(r"By model and policy \(decode MAPE\): (.*?)\. The largest", README, re.S).group(1)
    text = " ".join(text.split())
    base = _baselines()
    names = {"GPT-J": "gpt-j-6b", "Llama-3-8B": "llama-3-8b"}
    for part, rows in [(r"held-out H100 — (.*?); H100 → H200", "H100 held-out half"),
                       (r"H100 → H200 — (.*)$", "H200 (fitted on H100)")]:
        found = re.findall(r"(GPT-J|Llama-3-8B) (full|Keyformer) ([\d.]+)", re.search(part, text).group(1))
        assert len(found) == 4
        for model, policy, value in found:
            mape = base[(rows, f"kfsim fitted: {names[model]} {policy.lower()} decode")][0]
            assert value == f"{float(mape):.1f}", (rows, model, policy, mape)


def test_worked_example_measured_point():
    """The sentence after the worked example: the measured steps and the prediction's errors."""
    import pandas as pd

    from kfsim.inputs import make_setup
    from kfsim.predict import predict

    m = re.search(r"We measured this point on the H100: ([\d.]+) ms with Keyformer against ([\d.]+) ms with the full "
                  r"cache \(([\d.]+)x;.*?the prediction is within ([\d.]+) % and ([\d.]+) %", README, re.S)
    assert m, "README lost the measured-point sentence"
    rows = pd.read_csv(ROOT / "measure" / "data" / "h100-sxm.csv")
    point = rows[(rows.model == "llama-3-8b") & (rows.batch == 16) & (rows.context == 16384) & (rows.phase == "decode")]
    kf = point[point.kv_ratio == 0.2].step_ms.item()
    full = point[point.policy == "full"].step_ms.item()
    assert (m.group(1), m.group(2), m.group(3)) == (f"{kf:.2f}", f"{full:.2f}", f"{full / kf:.2f}")
    for ratio, measured, claim in [(0.2, kf, m.group(4)), (1.0, full, m.group(5))]:
        policy = "keyformer" if ratio < 1 else "full"
        s = make_setup(gpu="h100", model="llama-3-8b", engine="default", policy=policy, kv_ratio=ratio)
        predicted = float(predict(s, 16, 16384)["step_ms"])
        assert claim == f"{abs(predicted / measured - 1) * 100:.1f}", (policy, predicted, measured)


GOAL_COLUMNS = {  # the fused-decoder table's measured columns -> the grid each comes from (measure/data)
    "H100": ("h100-sxm-compiled.csv", "h100-sxm-microbench.csv"),
    "H200": ("h200-compiled.csv", "h200-microbench.csv"),
    "H200, options on": ("h200-compiled-write_first_fast_log_l2_hints.csv", "h200-microbench.csv"),
    "H200, all options": ("h200-compiled-write_first_fast_log_l2_hints_small_gemm_pos32_lane_partials_short_finish_"
                          "batch1_split.csv", "h200-microbench.csv"),
}


def _goal_row(label: str) -> dict:
    header = re.search(r"^\| measured \(compiled engine\) \|(.*)\| goal \|$", README, re.M)
    assert header, "README lost the fused-decoder table"
    line = re.search(r"^\| " + re.escape(label) + r" \|(.*)\|$", README, re.M)
    assert line, f"README has no row {label!r}"
    names = [c.strip() for c in header.group(1).split("|")]
    return dict(zip(names, [c.strip() for c in line.group(1).split("|")]))


def test_fused_decoder_goal_figures_match_the_committed_grids():
    """The goal rows of the fused-decoder table are what measure.fused_table gives for each committed grid."""
    pytest.importorskip("pandas")
    from measure.fused_table import summary, table

    data = ROOT / "measure" / "data"
    bandwidth = _goal_row("batch-1 full-cache step, (weights + KV) bandwidth / HBM read ceiling")
    per_model = _goal_row("the same, GPT-J-6B / Llama-3-8B")
    over = _goal_row("Keyformer step / full-cache step at its budget: median, worst")
    by_batch = _goal_row("the same, worst at batch 1 / 16 / 64")
    speedup = _goal_row("measured Keyformer speedup / `ideal`-engine speedup: median, worst")
    for column, (grid, micro) in GOAL_COLUMNS.items():
        s = summary(table(str(data / grid), str(data / micro)))
        bw = s["batch1_bw_fraction_by_model"]
        assert bandwidth[column] == "{:.3f}-{:.3f}".format(*s["batch1_bw_fraction"]), column
        assert per_model[column] == "{:.3f}-{:.3f} / {:.3f}-{:.3f}".format(*bw["gpt-j-6b"], *bw["llama-3-8b"])
        o, r = s["over_ideal_reduced_step"], s["speedup_over_predicted"]
        assert over[column] == f"{o['median']:.2f}, {o['worst']:.2f}", column
        assert by_batch[column] == " / ".join(f"{o['worst_by_batch'][b]:.2f}" for b in (1, 16, 64)), column
        assert speedup[column] == f"{r['median']:.2f}, {r['worst']:.2f}", column


def test_small_gemm_batch16_figures_match_the_committed_grids():
    """The README's small_gemm paragraph: the batch-16 grid with small_gemm against the options grid's batch 16."""
    pd = pytest.importorskip("pandas")
    from measure.fused_table import table

    data = ROOT / "measure" / "data"
    micro = str(data / "h200-microbench.csv")
    base = table(str(data / "h200-compiled-write_first_fast_log_l2_hints.csv"), micro)
    small = table(str(data / "h200-compiled-write_first_fast_log_l2_hints_small_gemm-batch16.csv"), micro)
    keys = ["model", "context", "policy", "kv_ratio"]
    m = base[base.batch == 16].merge(small, on=keys, suffixes=("_base", "_small"))
    assert len(m) == 30
    change = m.step_ms_small / m.step_ms_base - 1
    text = " ".join(README.split())
    assert (f"by a median {-change.median() * 100:.1f} % ({change.max() * 100:.1f} % longer to "
            f"{-change.min() * 100:.1f} % shorter)") in text
    at205 = m[(m.context == 205) & (m.policy == "full")].set_index("model")
    for model, name in (("gpt-j-6b", "GPT-J-6B"), ("llama-3-8b", "Llama-3-8B")):
        r = at205.loc[model]
        assert f"{r.bw_fraction_of_ceiling_base:.3f} to {r.bw_fraction_of_ceiling_small:.3f}" in text, model
    ratio = {v: m[f"speedup_over_predicted_{v}"].dropna() for v in ("base", "small")}
    assert (f"median {ratio['base'].median():.3f} (worst {ratio['base'].min():.3f}) to "
            f"{ratio['small'].median():.3f} (worst {ratio['small'].min():.3f})") in text
    assert pd.read_csv(data / "h200-compiled-write_first_fast_log_l2_hints_small_gemm-batch16.csv").throttle.gt(0).sum() == 7


#: the option set of the all-options grid, as its file names spell it, and the keys of a measured point
ALL_OPTIONS = "write_first_fast_log_l2_hints_small_gemm_pos32_lane_partials_short_finish_batch1_split"
POINT = ["model", "batch", "context", "policy", "kv_ratio"]


def _side_by_side(base: str, new: str):
    """Two committed measurement CSVs (measure/data names) merged on the point, the points both measured, with the
    step's change from base to new in per cent ("change"; the columns of each end in _a and _b)."""
    pd = pytest.importorskip("pandas")
    a, b = (pd.read_csv(ROOT / "measure" / "data" / name) for name in (base, new))
    m = a.merge(b, on=POINT, suffixes=("_a", "_b"))
    m = m[(m.status_a == "ok") & (m.status_b == "ok")].copy()
    m["change"] = (m.step_ms_b / m.step_ms_a - 1) * 100
    return m


def test_split_k_figures_match_the_committed_runs():
    """The README's sentence on small_gemm_64 and split_k: whole steps with both options against every option alone,
    measured in one run."""
    pd = pytest.importorskip("pandas")
    m = _side_by_side(f"h200-step-{ALL_OPTIONS}.csv", f"h200-step-{ALL_OPTIONS}_small_gemm_64_split_k.csv")
    assert len(m) == 20
    text = " ".join(README.split())
    assert f"were {m.change.min():.1f} to {m.change.max():.1f} % longer" in text
    r = m.set_index(POINT).loc[("llama-3-8b", 64, 820, "full", 1.0)]
    assert f"{r.step_ms_b:.3f} against {r.step_ms_a:.3f} ms" in text
    split = pd.read_csv(ROOT / "measure" / "data" / "h200-gemm-small-split.csv")
    down = split.set_index(["model", "product", "batch", "kernel"]).sort_index().loc[("llama-3-8b", "down", 64)].us
    assert f"{down['auto']:.1f} us unsplit, {down['auto split']:.1f} in 3 parts, {down['split 2']:.1f} in 2" in text


def test_fused_rotary_figures_match_the_committed_grids():
    """The README's sentences on fused_rotary: its grid against the all-options grid, its goal figures, and the run
    of both option sets side by side."""
    pd = pytest.importorskip("pandas")
    from measure.fused_table import summary, table

    grid = f"h200-compiled-{ALL_OPTIONS}_fused_rotary.csv"
    m = _side_by_side(f"h200-compiled-{ALL_OPTIONS}.csv", grid)
    text = " ".join(README.split())
    b = pd.read_csv(ROOT / "measure" / "data" / grid)
    assert (b.status == "ok").sum() == 86 and (b.throttle > 0).sum() == 25
    capped = b[(b.status == "ok") & (b.throttle > 0)]
    assert f"at {capped.sm_mhz.min():.0f}-{capped.sm_mhz.max():.0f} MHz" in text
    assert f"a median {-m.change[m.batch == 64].median():.1f} % shorter" in text
    assert m.change[m.batch < 64].abs().max() < 0.3  # "within 0.3 %"
    s = summary(table(str(ROOT / "measure" / "data" / grid), str(ROOT / "measure" / "data" / "h200-microbench.csv")))
    o, r = s["over_ideal_reduced_step"], s["speedup_over_predicted"]
    assert ("batch 1 at {:.3f}-{:.3f} of the read ceiling".format(*s["batch1_bw_fraction"]) + f", Keyformer's step at "
            f"most {o['worst']:.2f}x the ideal reduced step (median {o['median']:.2f}), its speedup at least "
            f"{r['worst']:.2f} of the ideal engine's (median {r['median']:.2f})") in text
    s2 = _side_by_side(f"h200-step-{ALL_OPTIONS}-run2.csv", f"h200-step-{ALL_OPTIONS}_fused_rotary_one_exp.csv")
    full64 = s2[(s2.batch == 64) & (s2.policy == "full")].change
    assert f"by {-full64.max():.1f}-{-full64.min():.1f} %" in text
    kf16 = s2[(s2.batch == 16) & (s2.policy == "keyformer")].change
    assert f"by {kf16.min():.1f} to +{kf16.max():.1f} %" in text


def test_side_finish_figures_match_the_committed_run():
    """The README's sentence on side_finish: Keyformer's steps with and without it, measured in one run."""
    m = _side_by_side(f"h200-step-{ALL_OPTIONS}_fused_rotary-keyformer.csv",
                      f"h200-step-{ALL_OPTIONS}_fused_rotary_side_finish.csv")
    assert len(m) == 15 and (m.policy == "keyformer").all()
    text = " ".join(README.split())
    b64, b16 = m.change[m.batch == 64], m.change[m.batch == 16]
    assert f"batch-64 steps by {b64.min():.1f} to +{b64.max():.1f} %" in text
    assert f"batch-16 steps by {b16.min():.1f}-{b16.max():.1f} %" in text


def test_keyformer_cost_figures_match_the_committed_runs():
    """The README's paragraph on where Keyformer's extra time goes: the ablations, dense_gqa, the L2 set-aside sweep,
    the l2_persist grid and the bytes no kernel removes."""
    pd = pytest.importorskip("pandas")
    from measure.ablate_keyformer import gap_shares
    from measure.fused_table import summary, table

    data = ROOT / "measure" / "data"
    text = " ".join(README.split())
    # the ablations
    rows = pd.read_csv(data / "h200-ablate-keyformer-llama.csv").to_dict("records")
    s = pd.DataFrame(gap_shares(rows))
    at = s[(s.batch == 64) & (s.tokens == 8192)].set_index("ablation")
    assert (f"batch 64 x 8192 tokens (full {at.full_us.iloc[0]:.1f}, Keyformer {at.keyformer_us.iloc[0]:.1f} us) the "
            f"split kernel's store of z removes {at.gap_share['z_store']:.2f} of the gap, the finish kernel "
            f"{at.gap_share['finish']:.2f} and the positions' read {at.gap_share['pos']:.2f}") in text
    small = s[s.ablation.isin(["noise", "partials", "extract"])].gap_share
    assert f"remove {small.min():.2f} to {small.max():.2f} of it at each of the 4 points" in text
    assert f"all of Keyformer's work {s[s.ablation == 'all'].gap_share.min():.2f}-" \
           f"{s[s.ablation == 'all'].gap_share.max():.2f}" in text
    assert f"costs {at.keyformer_us.iloc[0] - at.us['z_store']:.0f} us" in text
    # dense_gqa: its best configuration per point against the plain loop
    d = pd.concat([pd.read_csv(data / f"h200-attention-dense-{n}.csv") for n in ("variants", "configs")])
    d["dense"] = d.variant.str.contains("dense_gqa")
    best = d.groupby(["batch", "tokens", "policy", "dense"]).us_per_layer.min().unstack()
    change = (best[True] / best[False] - 1) * 100
    assert f"ran {change.min():.0f} % to +{change.max():.0f} % against the plain loop" in text
    # the L2 set-aside sweep
    sw = pd.read_csv(data / "h200-l2-sweep-llama.csv")
    aside = sw.groupby("l2_persist").l2_persist_bytes.first() / 2**20
    assert f"{aside['default']:.2f} MiB on this device by the driver's default" in text
    assert f"at most {aside['on']:.1f} MiB set aside" in text and f"24 MiB ({aside['24']:.2f} set)" in text
    us = sw.pivot_table(index=["batch", "tokens", "ablation"], columns="l2_persist", values="us_per_layer")
    r = us.loc[(16, 8192)]
    assert (f"156.5 -> 145.4 us per layer, as fast as with no store of z (145.7), the full cache 129.1 -> 129.7"
            == f"{r['default']['keyformer']:.1f} -> {r['24']['keyformer']:.1f} us per layer, as fast as with no store "
               f"of z ({r['24']['z_store']:.1f}), the full cache {r['default']['full']:.1f} -> {r['24']['full']:.1f}")
    assert f"{us.loc[(64, 3277, 'keyformer'), 'default']:.1f} -> {us.loc[(64, 3277, 'keyformer'), '24']:.1f}" in text
    slower = (us["on"] / us["default"] - 1)[us.index.get_level_values("ablation") != "z_store"] * 100
    assert f"made the kernels {slower.min():.0f}-{slower.max():.0f} % slower" in text
    assert f"{us.loc[(64, 8192, 'full'), 'on']:.1f} us" in text
    # the l2_persist grid against the fused_rotary grid
    grid = f"h200-compiled-{ALL_OPTIONS}_fused_rotary_l2_persist.csv"
    m = _side_by_side(f"h200-compiled-{ALL_OPTIONS}_fused_rotary.csv", grid).set_index(POINT)
    fits = [("llama-3-8b", 16, 16384, "keyformer", 0.5), ("llama-3-8b", 64, 4096, "keyformer", 0.5),
            ("llama-3-8b", 64, 16384, "keyformer", 0.2)]
    for p in fits:
        assert f"{m.step_ms_a[p]:.3f} -> {m.step_ms_b[p]:.3f}" in text, p
    others = m.change.drop(fits)
    assert others.min() > -0.01  # "at most ... longer": none shorter
    assert f"the others at most {others.max():.1f} % longer (median {others.median():.1f} %)" in text
    b = pd.read_csv(data / grid)
    capped = b[(b.status == "ok") & (b.throttle > 0)]
    assert (b.status == "ok").sum() == 86
    assert f"{len(capped)} under the power cap at {capped.sm_mhz.min():.0f}-{capped.sm_mhz.max():.0f} MHz" in text
    g = summary(table(str(data / grid), str(data / "h200-microbench.csv")))
    o, sp = g["over_ideal_reduced_step"], g["speedup_over_predicted"]
    assert ("batch 1 at {:.3f}-{:.3f} of the read ceiling".format(*g["batch1_bw_fraction"]) +
            f", Keyformer's step at most {o['worst']:.2f}x the ideal reduced step") in text
    assert f"(median {o['median']:.2f}), its speedup at least {sp['worst']:.2f} of the ideal engine's " \
           f"(median {sp['median']:.2f})" in text
    # the bytes no kernel removes, and the share of the step they take at batch 64 x 16384, kv-ratio 0.5
    llama, gptj = (2 * 4 * 4 + 8 + 8) / 512, (2 * 4 * 1 + 8 + 8) / 1024
    assert f"48 bytes on Llama-3-8B's 512 of K and V ({llama * 100:.1f} %), 24 on GPT-J-6B's 1024 " \
           f"({gptj * 100:.1f} %)" in text
    prof = (data / "h200-profile-keyformer-all-options.txt").read_text()
    full = re.search(r"B=64 C=8192 full .*? step (\d+) us.*?\n\s+attention\s+(\d+) us", prof, re.S)
    step, attention = int(full.group(1)) / 1e3, int(full.group(2)) / 1e3
    assert f"attention is {attention:.1f} of its {step:.1f} ms step" in text
    assert f"at least {llama:.3f} x {attention:.1f} = {llama * attention:.1f} ms" in text
    assert f"{llama * attention / step * 100:.1f} % of the step" in text


def test_transposed_cublas_figures_match_the_committed_run():
    pd = pytest.importorskip("pandas")
    d = pd.read_csv(ROOT / "measure" / "data" / "h200-gemm-cublas-transposed.csv")
    p = d.pivot_table(index=["model", "product", "batch"], columns="kernel", values="us")
    change, copy = (p.cublas_t / p.cublas - 1) * 100, p.cublas_t_copy - p.cublas
    text = " ".join(README.split())
    assert len(p) == 20
    assert f"{change.min():.1f} to +{change.max():.1f} % against `F.linear`" in text
    assert f"contiguous adds {copy.min():.1f}-{copy.max():.1f} us" in text
