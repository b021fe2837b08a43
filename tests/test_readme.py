"""The README's and docs' figures are claims: the first prediction, the trust table and the calibration table must
match what the code and the committed reports give today (a refit or a model change that moves them fails here,
not in a reader's hands)."""
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from kfsim.cli import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
VALIDATION = (ROOT / "docs" / "validation.md").read_text()


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
    line = re.search(r"^\| " + re.escape(label) + r" \((\d+)( rows)?\) \|(.*)\|$", VALIDATION, re.M)
    assert line, f"docs/validation.md has no row {label!r}"
    rows, col = README_ROWS[label]
    base = _baselines()
    cells = [c.replace("*", "").strip() for c in line.group(3).split("|")]
    assert len(cells) == len(PREDICTORS)
    for predictor, cell in zip(PREDICTORS, cells):
        mape, worst, n = base[(rows, predictor)][col:col + 3]
        assert int(line.group(1)) == int(n), (label, predictor)
        assert cell == f"{float(mape):.1f} / {float(worst):.1f}", (label, predictor, mape, worst)


def test_by_model_figures_match_reports_baselines():
    text = re.search(r"By model and policy \(decode MAPE\): (.*?)\. The largest", VALIDATION, re.S).group(1)
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
                  r"cache \(([\d.]+)x;.*?the prediction is within ([\d.]+) % and ([\d.]+) %", VALIDATION, re.S)
    assert m, "docs/validation.md lost the measured-point sentence"
    rows = pd.read_csv(ROOT / "data" / "h100-sxm-plain" / "rows.csv")
    point = rows[(rows.model == "llama-3-8b") & (rows.batch == 16) & (rows.context == 16384) & (rows.phase == "decode")]
    kf = point[point.kv_ratio == 0.2].step_ms.item()
    full = point[point.policy == "full"].step_ms.item()
    assert (m.group(1), m.group(2), m.group(3)) == (f"{kf:.2f}", f"{full:.2f}", f"{full / kf:.2f}")
    for ratio, measured, claim in [(0.2, kf, m.group(4)), (1.0, full, m.group(5))]:
        policy = "keyformer" if ratio < 1 else "full"
        s = make_setup(gpu="h100", model="llama-3-8b", engine="default", policy=policy, kv_ratio=ratio)
        predicted = float(predict(s, 16, 16384)["step_ms"])
        assert claim == f"{abs(predicted / measured - 1) * 100:.1f}", (policy, predicted, measured)


def _summary(rows: str, predictor: str = "kfsim fitted engine") -> dict:
    for r in json.loads((ROOT / "reports" / "validation-summary.json").read_text()):
        if r["rows"] == rows and r["predictor"] == predictor:
            return r
    raise AssertionError(f"reports/validation-summary.json has no row {rows!r} / {predictor!r}")


def _held_out_mape(report: str) -> float:
    text = (ROOT / "reports" / report / "report.md").read_text()
    return float(re.search(r"^\| all \| ([\d.]+) \|", text, re.M).group(1))


def _model_mape(report: str, gpu: str, model: str) -> float:
    text = (ROOT / "reports" / report / "report.md").read_text()
    return float(re.search(rf"^\| decode \| {gpu} \| {model} \| full \| 1 \| ([\d.]+) \|", text, re.M).group(1))


def test_trust_table_matches_the_reports():
    """README's "How far to trust it": each engine's held-out and cross-GPU decode MAPE as the reports give it."""
    table = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([a-z-]+)` \|.*\|.*\| (.*) \|$", README, re.M)}
    expect = {
        "default": f"H100 held-out half {_summary('H100 held-out half')['decode_mape']:.1f} %; all H200 rows "
                   f"{_summary('H200 (fitted on H100)')['decode_mape']:.1f} %",
        "compiled": f"H200 held-out half {_summary('compiled: H200 held-out half')['decode_mape']:.1f} %; MPT-7B "
                    f"(never fitted) {_held_out_mape('compiled-h200-mpt'):.1f} %",
        "compiled-options": f"H200 held-out half {_held_out_mape('compiled-options-h200-holdout'):.1f} %",
        "hf-eager": f"H200 held-out half {_held_out_mape('hf-eager-h200-holdout'):.1f} %; Mistral-7B and MPT-7B "
                    f"(fitted on GPT-J-6B and Llama-3-8B) {_held_out_mape('hf-eager-h200-unseen-models'):.1f} %; "
                    f"all H100 rows {_held_out_mape('hf-eager-h200-to-h100'):.1f} %; the H100's Keyformer rows on a "
                    f"slower host {_held_out_mape('hf-eager-h100-slow-host'):.1f} %, on another host "
                    f"{_held_out_mape('hf-eager-h100-keyformer'):.1f} %; H100 prefill: held-out half "
                    f"{_held_out_mape('hf-eager-h100-prefill-holdout'):.1f} %, Mistral-7B and MPT-7B "
                    f"{_held_out_mape('hf-eager-h100-prefill-unseen-models'):.1f} %",
        "hf-compiled": f"H100 GPT-J-6B rows {_model_mape('hf-compiled-h200-to-h100', 'h100-sxm', 'gpt-j-6b'):.1f} %, "
                       f"Llama-3-8B rows {_model_mape('hf-compiled-h200-to-h100', 'h100-sxm', 'llama-3-8b'):.1f} %; "
                       f"H100 held-out half, Keyformer included {_held_out_mape('hf-compiled-h100-holdout'):.1f} %; "
                       f"Mistral-7B's and MPT-7B's Keyformer caches (fitted on GPT-J-6B and Llama-3-8B, H100) "
                       f"{_held_out_mape('hf-compiled-h100-unseen-models'):.1f} %; "
                       f"Mistral-7B's full cache (no CUDA graph) "
                       f"{_held_out_mape('hf-compiled-h200-sliding-window'):.1f} %",
        "ideal": f"misses the same H200 rows by "
                 f"{_summary('H200 (fitted on H100)', 'kfsim ideal roofline')['decode_mape']:.0f} %",
    }
    assert table == expect


def test_the_shipped_caveat_is_what_the_reports_measure():
    """engines/hf-compiled.yaml's caveat quotes measured figures: they must be those of the committed reports."""
    import pandas as pd

    from kfsim.engine import get_engine

    script = _make_validation()
    rows = pd.concat([pd.read_csv(p) for p in sorted((ROOT / "reports").glob("hf-compiled-*-sliding-window/rows.csv"))])
    assert get_engine("hf-compiled").caveats == (script.graphless_caveat(rows),)


def test_the_short_prompt_caveat_is_what_the_prefill_report_measures():
    """engines/hf-eager.yaml's short-prompt caveat quotes the committed prefill report's figures."""
    import pandas as pd

    from kfsim.engine import get_engine

    script = _make_validation()
    rows = pd.read_csv(ROOT / "reports" / "hf-eager-h100-prefill" / "rows.csv")
    assert get_engine("hf-eager").caveats == (script.short_prompt_caveat(rows),)


def _make_validation():
    """reports/make_validation.py as a module (it is a script, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_validation", ROOT / "reports" / "make_validation.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script
