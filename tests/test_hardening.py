"""Named regressions of the inputs that used to crash, lie or destroy a file (one line `Error:`, exit 2, inputs
unchanged, nothing half-written)."""
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from kfsim.cli import cli

ROOT = Path(__file__).resolve().parents[1]
ROWS = ROOT / "data" / "h100-sxm-plain" / "rows.csv"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(r, text):
    assert r.exit_code == 2, r.output
    assert r.output.startswith("Error: ") and text in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_calibrate_never_writes_its_engine_over_its_measurements(tmp_path):
    m = tmp_path / "m.csv"
    shutil.copy(ROWS, m)
    before = m.read_bytes()
    one_line_error(run("calibrate", m, "--out", m), "would overwrite the input")
    assert m.read_bytes() == before


def test_validate_never_writes_its_rows_over_its_input(tmp_path):
    (tmp_path / "results").mkdir()
    rows = tmp_path / "results" / "rows.csv"
    shutil.copy(ROWS, rows)
    before = rows.read_bytes()
    one_line_error(run("validate", rows, "--engine", "default", "--out", tmp_path / "results"), "would overwrite")
    assert rows.read_bytes() == before


@pytest.mark.parametrize("args", [
    ("sweep", "--seq", "64", "--out", "{tmp}/no/such/dir/s.csv"),
    ("calibrate", ROWS, "--measured-engine", "torch-graph", "--out", "{tmp}/no/such/dir/e.yaml"),
])
def test_outputs_in_missing_folders_are_made(tmp_path, args):
    args = [str(a).replace("{tmp}", str(tmp_path)) for a in args]
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert Path(args[-1]).is_file()


def test_report_into_an_existing_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("keep")
    one_line_error(run("report", "--out", f), "a file of that name exists")
    assert f.read_text() == "keep"


@pytest.mark.parametrize("encoding", ["utf-16", "latin-1"])
def test_yaml_that_is_not_utf8_is_one_line(tmp_path, encoding):
    p = tmp_path / "gpu.yaml"
    text = (ROOT / "hw_profiles" / "h100-sxm.yaml").read_text().replace("NVIDIA H100", "NVIDIA Hé100")
    p.write_bytes(text.encode(encoding))
    one_line_error(run("predict", "--hw", p, "--seq", "64"), "not UTF-8")


@pytest.mark.parametrize("kind, field, value, flag", [
    ("hw_profiles/h100-sxm.yaml", "hbm_bandwidth_gbps: 3350", "hbm_bandwidth_gbps: .nan", "--hw"),
    ("hw_profiles/h100-sxm.yaml", "tdp_w: 700", "tdp_w: .inf", "--hw"),
    ("engines/default.yaml", "kernel_overhead_us: 0.7", "kernel_overhead_us: .nan  # 0.7", "--engine"),
])
def test_nan_and_inf_in_yaml_are_refused(tmp_path, kind, field, value, flag):
    """A comparison with NaN is false, so a range check alone passes it: a NaN bandwidth once printed a step."""
    text = (ROOT / kind).read_text()
    assert field in text
    p = tmp_path / Path(kind).name
    p.write_text(text.replace(field, value, 1))
    args = ["predict", "--seq", "64", flag, p] + (["--gpu", "h100"] if flag == "--engine" else [])
    one_line_error(run(*args), "not a finite number")


@pytest.mark.parametrize("args, text", [
    (("predict", "--gpu", "h100", "--seq", "64", "--model", ""), "--model is empty"),
    (("predict", "--gpu", "h100", "--seq", "64", "--engine", ""), "--engine is empty"),
    (("predict", "--gpu", "", "--seq", "64"), "--gpu is empty"),
    (("predict", "--hw", "", "--seq", "64"), "--hw is empty: give a file"),
    (("calibrate", ROWS, "--out", ""), "--out is empty"),
    (("report", "--out", ""), "--out is empty"),
])
def test_empty_strings_never_mean_the_default(args, text):
    one_line_error(run(*args), text)


@pytest.mark.parametrize("args, text", [
    (("sweep", "--seq", "1:1000000000:1"), "has 1,000,000,000 values; allowed: at most 1,000,000"),
    (("sweep", "--seq", "1:100000:1", "--batch", "1:1000:1"), "raise it with --max-points"),
    (("sweep", "--seq", "nan"), "not a finite number"),
    (("sweep", "--seq", "10", "--batch", "1e30"), "too large"),
    (("predict", "--gpu", "h100", "--seq", "10", "--prompt-len", "5", "--gen-len", "100000000"), "--gen-len"),
])
def test_blow_ups_are_refused_before_any_work(args, text):
    one_line_error(run(*args), text)


@pytest.mark.parametrize("args, text", [
    (("plan", "--prompt-len", "5", "--gen-len", "5", "--target-tokens-per-s", "10", "--usd-per-hour", "h100=-2.5"),
     "allowed: a finite number > 0"),
    (("plan", "--prompt-len", "5", "--gen-len", "5", "--target-tokens-per-s", "10", "--usd-per-hour", "h1000=2.5"),
     "unknown gpu 'h1000'"),
    (("predict", "--gpu", "h100", "--seq", "10", "--kv-ratio", "1.0000001"), "1.0000001 is out of range"),
])
def test_messages_name_the_real_problem(args, text):
    one_line_error(run(*args), text)


def test_a_gpu_without_bf16_answers_in_fp16_and_says_so():
    r = run("predict", "--gpu", "v100", "--seq", "2048")
    assert r.exit_code == 0, r.output
    assert "weights fp16, KV fp16" in r.output and "no bf16 tensor rate" in r.output


@pytest.mark.parametrize("column, value, text", [
    ("batch", "1.5", "column batch has a bad value"),
    ("context", "inf", "column context has a bad value"),
    ("step_ms", "inf", "column step_ms has a bad value"),
    ("step_ms", "2.2250738585e-313", "allowed: a finite number >= 1e-06"),  # a denormal, found by the fuzz test
    ("kv_ratio", "1.5", "at most 1"),
])
def test_measurement_cells_are_checked_with_file_and_row(tmp_path, column, value, text):
    import pandas as pd

    df = pd.read_csv(ROWS)
    df[column] = df[column].astype(object)
    df.loc[3, column] = value
    p = tmp_path / "m.csv"
    df.to_csv(p, index=False)
    r = run("calibrate", p, "--measured-engine", "torch-graph", "--out", tmp_path / "e.yaml")
    one_line_error(r, text)
    assert str(p) in r.output and "at row 5" in r.output and not (tmp_path / "e.yaml").exists()


def test_a_folder_given_as_measurements_is_one_line(tmp_path):
    one_line_error(run("validate", tmp_path, "--engine", "default"), "is a folder")


@pytest.mark.parametrize("text, message", [("gpu,x\nh100,1\n", "no column bench, gbps"), ("", "No columns")])
def test_a_microbenchmark_file_without_its_columns_is_one_line(tmp_path, text, message):
    mb = tmp_path / "mb.csv"
    mb.write_text(text)
    one_line_error(run("calibrate", ROWS, "--measured-engine", "torch-graph", "--microbench", mb, "--out",
                       tmp_path / "e.yaml"), message)


def test_non_finite_microbenchmark_rates_cap_nothing():
    import pandas as pd

    from kfsim import calibrate
    from kfsim.hardware import get_hardware

    micro = pd.DataFrame({"bench": ["hbm_read", "sdpa_decode"], "gbps": [float("nan"), -3.0]})
    assert calibrate.ceilings(micro, get_hardware("h100")) == {}


def test_a_failed_report_leaves_nothing_behind(tmp_path, monkeypatch):
    from kfsim import report

    def broken(*args, **kw):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "fig_bytes", broken)
    with pytest.raises(RuntimeError):
        report.build("llama-3-8b", ["l4"], "default", tmp_path / "rep")
    assert not (tmp_path / "rep").exists() and list(tmp_path.iterdir()) == []


def test_a_row_that_cannot_be_written_whole_is_cut_back_off(tmp_path, monkeypatch):
    """A full disk mid-row once left a CSV ending mid-row that looked valid."""
    import errno
    import os

    from kfsim import measurements
    from kfsim.errors import KfsimError

    path = tmp_path / "rows.csv"
    row = {"gpu": "h100-sxm", "model": "gpt-j-6b", "batch": 1, "context": 1024, "kv_ratio": 1.0, "policy": "full",
           "step_ms": 6.7, "status": "ok"}
    measurements.append_row(path, row)
    before = path.read_bytes()
    real_write = os.write

    def half_then_full(fd, data):
        if len(data) > 8:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(KfsimError, match="No space left on device.*left as it was"):
        measurements.append_row(path, dict(row, batch=2))
    assert path.read_bytes() == before


@pytest.mark.parametrize("args, text", [
    (("plan", "--prompt-len", "5", "--gen-len", "5", "--target-tokens-per-s", "nan"), "'nan' is not a finite number"),
    (("simulate", "--gpu", "h100", "--rate", "inf", "--prompt-len", "5", "--gen-len", "5"), "not a finite number"),
    (("simulate", "--gpu", "h100", "--rate", "1", "--prompt-len", "normal:inf:3", "--gen-len", "5"), "at most 10,000,000"),
    (("simulate", "--gpu", "h100", "--rate", "1", "--prompt-len", "5", "--gen-len", "100000000"), "at most 1,000,000"),
    (("plan", "--prompt-len", "5", "--gen-len", "9" * 30, "--target-tokens-per-s", "10"), "--gen-len"),
])
def test_non_finite_and_huge_flags_are_refused(args, text):
    """click's FloatRange passes NaN (a comparison with NaN is false); a NaN target once reached an int()."""
    one_line_error(run(*args), text)


def test_a_prompt_that_cannot_fit_is_refused_before_the_progress_bar():
    r = run("simulate", "--gpu", "h100", "--rate", "1", "--prompt-len", "2000000", "--gen-len", "5")
    one_line_error(r, "does not fit in the GPU's memory")


def test_a_failed_validate_leaves_no_folder(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text(ROWS.read_text().replace("h100-sxm,gpt-j-6b,4,", "h100-sxm,gpt-k-6b,4,", 1))
    one_line_error(run("validate", m, "--engine", "default", "--measured-engine", "torch-graph", "--out",
                       tmp_path / "report"), "gpt-k-6b")
    assert not (tmp_path / "report").exists()


def test_an_empty_numeric_cell_is_named_without_a_numpy_repr(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text(ROWS.read_text().replace("h100-sxm,gpt-j-6b,4,1024,", "h100-sxm,gpt-j-6b,,1024,", 1))
    one_line_error(run("validate", m, "--engine", "default", "--measured-engine", "torch-graph"),
                   "column batch has a bad value (an empty cell) at row 3")


def test_a_gpu_profile_without_an_fp32_rate_is_refused(tmp_path):
    p = tmp_path / "gpu.yaml"
    p.write_text((ROOT / "hw_profiles" / "h100-sxm.yaml").read_text().replace("fp32: 67,", "fp32: null,"))
    one_line_error(run("predict", "--hw", p, "--seq", "64"), "peak_dense_tflops.fp32 is null")


@pytest.mark.parametrize("value, text", [("1e12", "is too large"), ("1e-300", "is too small")])
def test_numbers_beyond_any_physical_figure_are_refused(tmp_path, value, text):
    """8.7e18 GB of memory once overflowed a cast; 2e-311 TFLOP/s overflowed a division."""
    p = tmp_path / "gpu.yaml"
    p.write_text((ROOT / "hw_profiles" / "h100-sxm.yaml").read_text().replace("memory_gb: 80", f"memory_gb: {value}"))
    one_line_error(run("predict", "--hw", p, "--seq", "64"), text)


def test_an_option_that_cannot_serve_has_no_figures_in_json():
    r = run("plan", "--json", "--prompt-len", "512", "--gen-len", "128", "--target-tokens-per-s", "2000",
            "--max-step-ms", "2")
    import json

    assert r.exit_code == 1
    options = json.loads(r.stdout)
    assert options and all(not o["feasible"] and o["step_ms"] is None and o["batch"] is None for o in options)


def test_scientific_notation_that_yaml_reads_as_text_is_a_number(tmp_path):
    """YAML 1.1 reads 3.35e3 (no exponent sign) as text: a user writing it meant 3350."""
    p = tmp_path / "gpu.yaml"
    p.write_text((ROOT / "hw_profiles" / "h100-sxm.yaml").read_text()
                 .replace("hbm_bandwidth_gbps: 3350", "hbm_bandwidth_gbps: 3.35e3"))
    assert run("predict", "--hw", p, "--seq", "64", "--json").stdout == \
        run("predict", "--gpu", "h100", "--seq", "64", "--json").stdout
