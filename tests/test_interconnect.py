"""Tensor-parallel rows end to end in the model: the interconnect terms fitted from an all-reduce microbenchmark,
used by predictions, rows read with their tp, reported apart by validate and set aside by calibrate."""
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from kfsim import measurements
from kfsim.calibrate import fit_interconnect
from kfsim.cli import cli
from kfsim.engine import get_engine
from kfsim.errors import KfsimError
from kfsim.hardware import get_hardware
from kfsim.inputs import make_setup
from kfsim.predict import predict
from kfsim.validate import by_tp, compare, markdown

H200 = get_hardware("h200")
ONE_WAY = H200.interconnect_gbps / 2 * 1e9  # 450 GB/s: half of NVLink4's 900 GB/s both ways


def run(*args):
    return CliRunner().invoke(cli, list(args))


def allreduce_rows(latency_us=12.0, fraction=0.8, tp=2, sizes=(8192, 65536, 1 << 20, 16 << 20, 256 << 20)):
    """Microbenchmark rows of a synthetic interconnect: time = latency + 2(tp-1)/tp x bytes / (fraction x one way)."""
    sent = [2 * (tp - 1) / tp * b for b in sizes]
    ms = [(latency_us * 1e-6 + s / (fraction * ONE_WAY)) * 1e3 for s in sent]
    return pd.DataFrame({"bench": "allreduce", "bytes": list(sizes), "median_ms": ms, "tp": tp, "gpu": "h200",
                         "gbps": [s / (m * 1e-3) / 1e9 for s, m in zip(sent, ms)]})


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_interconnect_fit_recovers_latency_and_bandwidth(tp):
    got = fit_interconnect(allreduce_rows(12.0, 0.8, tp), H200)
    assert got["allreduce_latency_us"] == pytest.approx(12.0, rel=1e-6)
    assert got["interconnect_bandwidth_fraction"] == pytest.approx(0.8, rel=1e-6)


def test_interconnect_fit_needs_two_message_sizes_and_ignores_other_benches():
    assert fit_interconnect(pd.DataFrame({"bench": ["hbm_read"], "bytes": [1.0], "median_ms": [1.0]}), H200) == {}
    with pytest.raises(KfsimError, match="at least two sizes"):
        fit_interconnect(allreduce_rows(sizes=(8192,)), H200)


def test_engine_interconnect_terms_hand_count():
    """GPT-J-6B at batch 1 over 2 H200s: 28 layers x 2 all-reduces of 1 x 4096 bf16 = 8192 bytes; each 20 us +
    1 x 8192 / (0.5 x 450 GB/s) = 20.0364 us; 56 of them 1.12204 ms."""
    eng = dataclasses.replace(get_engine("ideal"), allreduce_latency_us=20.0, interconnect_bandwidth_fraction=0.5)
    s = make_setup(gpu="h200", model="gpt-j-6b", engine="ideal", tp=2)
    out = predict(dataclasses.replace(s, engine=eng), 1, 1024)
    assert float(out["comm_ms"]) == pytest.approx(56 * (20e-6 + 8192 / (0.5 * ONE_WAY)) * 1e3, rel=1e-9)
    # without measured terms, the profile's latency (8 us) at the datasheet bandwidth
    plain = predict(s, 1, 1024)
    assert float(plain["comm_ms"]) == pytest.approx(56 * (8e-6 + 8192 / ONE_WAY) * 1e3, rel=1e-9)


def _rows(tp_step_ms=None):
    base = {"gpu": "h200", "model": "gpt-j-6b", "phase": "decode", "policy": "full", "kv_ratio": 1.0}
    rows = [{**base, "batch": b, "context": c, "tp": 1, "step_ms": 8.0 + b * 0.01 + c * 1e-4}
            for b in (1, 2, 4, 8, 16, 32, 64) for c in (1024, 2048, 4096)]
    rows += [{**base, "batch": b, "context": 4096, "tp": 2, "step_ms": tp_step_ms or 5.0} for b in (1, 16)]
    return pd.DataFrame(rows)


def test_rows_keep_their_tp_and_validate_reports_them_apart(tmp_path):
    path = tmp_path / "m.csv"
    _rows().to_csv(path, index=False)
    df = measurements.read(path)
    assert sorted(df["tp"].unique()) == [1, 2]
    cmp = compare(df, get_engine("default"))
    # a tp-2 row is predicted on half the model plus its all-reduces, not as one GPU
    one = make_setup(gpu="h200", model="gpt-j-6b", engine="default", tp=2)
    assert cmp[cmp["tp"] == 2]["predicted_ms"].iloc[0] == pytest.approx(float(predict(one, 1, 4096)["step_ms"]))
    assert [t["tp"] for t in by_tp(cmp)] == [1, 2] and by_tp(cmp)[1]["n"] == 2
    assert "| tp 2 (2) |" in markdown(cmp, get_engine("default"), "t", ["m.csv"], [])
    r = run("validate", str(path), "--engine", "default", "--json")
    assert r.exit_code == 0, r.output
    assert [t["tp"] for t in json.loads(r.output)["by_tp"]] == [1, 2]
    assert "tp 2, 2 rows: MAPE" in run("validate", str(path), "--engine", "default").output


def test_rows_without_tp_report_as_before():
    df = _rows()
    df = df[df["tp"] == 1].drop(columns="tp")
    cmp = compare(df, get_engine("default"))
    assert by_tp(cmp) == [] and "| tp" not in markdown(cmp, get_engine("default"), "t", ["m.csv"], [])


@pytest.mark.parametrize("cell", ["1.5", "0", "x", "-2"])
def test_a_bad_tp_cell_is_named(tmp_path, cell):
    path = tmp_path / "m.csv"
    df = _rows().astype({"tp": object})
    df.loc[3, "tp"] = cell
    df.to_csv(path, index=False)
    with pytest.raises(KfsimError, match=f"column tp has a bad value .*{cell}.* at row 5"):
        measurements.read(path)


def test_a_tp_the_model_cannot_split_is_a_one_line_error(tmp_path):
    path = tmp_path / "m.csv"
    df = _rows()
    df.loc[0, "tp"] = 3
    df.to_csv(path, index=False)
    r = run("validate", str(path), "--engine", "default")
    assert r.exit_code == 2 and r.output.startswith("Error: ") and "--tp 3" in r.output


def test_tp_one_keys_as_a_row_without_tp():
    row = {"gpu": "h200", "model": "gpt-j-6b", "batch": 1, "context": 1024, "kv_ratio": 1.0, "policy": "full"}
    assert measurements.point_key({**row, "tp": 1}) == measurements.point_key(row)
    assert measurements.point_key({**row, "tp": 2}) != measurements.point_key(row)


def test_calibrate_sets_tp_rows_aside_and_fits_the_interconnect(tmp_path):
    rows, micro, out = tmp_path / "m.csv", tmp_path / "micro.csv", tmp_path / "e.yaml"
    _rows().to_csv(rows, index=False)
    allreduce_rows(15.0, 0.7).to_csv(micro, index=False)
    r = run("calibrate", str(rows), "--microbench", str(micro), "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    assert "2 tensor-parallel row(s) set aside" in r.stderr
    fit = json.loads(r.stdout)
    assert fit["n"] == 21 and fit["tensor_parallel_rows_set_aside"] == 2
    assert fit["fitted"]["allreduce_latency_us"] == pytest.approx(15.0, rel=1e-3)
    assert fit["fitted"]["interconnect_bandwidth_fraction"] == pytest.approx(0.7, rel=1e-3)
    eng = get_engine(str(out))
    assert eng.allreduce_latency_us == pytest.approx(15.0, rel=1e-3) and "interconnect" in eng.source
    # every row split over GPUs: nothing to fit, said in one line
    only = tmp_path / "tp.csv"
    _rows()[lambda d: d["tp"] == 2].to_csv(only, index=False)
    r = run("calibrate", str(only), "--out", str(tmp_path / "f.yaml"))
    assert r.exit_code == 2 and "every row is tensor-parallel" in r.output


def test_prediction_of_tp_rows_improves_with_the_fitted_interconnect(tmp_path):
    """Rows measured on a slow interconnect (40 us per all-reduce): the engine with the fitted terms predicts them,
    the datasheet's 8 us does not."""
    s = make_setup(gpu="h200", model="gpt-j-6b", engine="default", tp=2)
    slow = dataclasses.replace(s, engine=dataclasses.replace(s.engine, allreduce_latency_us=40.0,
                                                             interconnect_bandwidth_fraction=0.6))
    measured = float(predict(slow, 1, 4096)["step_ms"])
    df = _rows(measured)
    df = df[(df["tp"] == 2) & (df["batch"] == 1)]
    fitted = {**fit_interconnect(allreduce_rows(40.0, 0.6), H200)}
    better = dataclasses.replace(get_engine("default"), **fitted)
    assert abs(compare(df, better)["error_pct"].iloc[0]) < 1e-6
    assert abs(compare(df, get_engine("default"))["error_pct"].iloc[0]) > 5
    assert np.isfinite(compare(df, better)["predicted_ms"]).all()
