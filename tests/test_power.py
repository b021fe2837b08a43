"""The board-power model (kfsim.power): a hand count, recovery of known figures by the fit, the TDP cap, and the
fallback for GPUs without measured power."""
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kfsim import power
from kfsim.cli import cli
from kfsim.hardware import get_hardware
from kfsim.inputs import make_setup
from kfsim.predict import predict

ROWS = Path(__file__).resolve().parents[1] / "data" / "h200-plain-models" / "rows.csv"


def test_hand_count_on_the_h200():
    """4 TB/s of HBM and 1 TFLOP/s: 75.5 W + 132.2 pJ x 4e12 /s + 0.65 pJ x 1e12 /s = 75.5 + 528.8 + 0.65 W."""
    hw = get_hardware("h200")
    p = power.board_power_w(hw, moved_bytes=4e9, flops=1e9, seconds=1e-3, fallback_fraction=0.5)
    assert p == pytest.approx(75.5 + 528.8 + 0.65)


def test_power_is_capped_at_the_board_limit():
    hw = get_hardware("h200")
    assert power.board_power_w(hw, 1e12, 1e15, 1e-3, 0.5) == hw.tdp_w


def test_a_gpu_without_measured_power_uses_tdp_times_the_fraction():
    hw = get_hardware("a100")
    assert not power.has_model(hw)
    assert power.board_power_w(hw, 1e9, 1e9, 1e-3, 0.4) == pytest.approx(0.4 * hw.tdp_w)


def test_the_fit_recovers_known_figures():
    rng = np.random.default_rng(0)
    bps, fps = rng.uniform(1e12, 4.5e12, 40), rng.uniform(1e11, 3e14, 40)
    watts = 70.0 + 120e-12 * bps + 0.9e-12 * fps
    got = power.fit(watts, 70.0, bps, fps)
    assert got["pj_per_byte"] == pytest.approx(120, rel=1e-3) and got["pj_per_flop"] == pytest.approx(0.9, rel=1e-2)
    assert got["mape_pct"] < 0.01


def test_energy_per_token_falls_with_batch_and_rises_with_context():
    s = make_setup(gpu="h200", model="llama-3-8b")
    e = predict(s, np.array([1, 8, 64]), 4096)["energy_per_token_j"]
    assert np.all(np.diff(e) < 0)
    e = predict(s, 8, np.array([1024, 4096, 16384]))["energy_per_token_j"]
    assert np.all(np.diff(e) > 0)


def test_fit_power_on_the_committed_h200_campaign_predicts_held_out_energy():
    r = CliRunner().invoke(cli, ["fit-power", str(ROWS), "--measured-engine", "torch-graph", "--json"])
    assert r.exit_code == 0, r.output
    import json

    out = json.loads(r.stdout)
    assert out["rows_above_limit_dropped"] == 0 and out["held_out_energy"]["n"] > 50
    assert out["held_out_energy"]["mape"] < 10
    hw = get_hardware("h200")  # the profile carries what this command fits (to 1 pJ/byte)
    assert out["pj_per_byte"] == pytest.approx(hw.pj_per_byte, abs=1.0) and out["idle_w"] == hw.idle_w


def test_profile_power_figures_need_a_source(tmp_path):
    text = (Path(__file__).resolve().parents[1] / "hw_profiles" / "h100-sxm.yaml").read_text()
    p = tmp_path / "g.yaml"
    p.write_text(text.replace("tdp_w: 700", "tdp_w: 700\nidle_w: 70"))
    r = CliRunner().invoke(cli, ["predict", "--hw", str(p), "--seq", "64"])
    assert r.exit_code == 2 and "no source for idle_w" in r.output


def test_fit_power_bad_input_is_one_line():
    r = CliRunner().invoke(cli, ["fit-power", str(ROWS), "--holdout", "nan"])
    assert r.exit_code == 2 and "'--holdout': 'nan' is not a finite number; allowed" in r.output
    old = Path(__file__).resolve().parents[1] / "data" / "h200-plain" / "rows.csv"  # measured before idle_w
    r = CliRunner().invoke(cli, ["fit-power", str(old), "--measured-engine", "torch-graph"])
    assert r.exit_code == 2 and "needs the columns power_w and idle_w" in r.output


def test_rows_without_power_are_counted_not_silently_dropped():
    h100 = Path(__file__).resolve().parents[1] / "data" / "h100-sxm-plain" / "rows.csv"
    r = CliRunner().invoke(cli, ["fit-power", str(ROWS), str(h100), "--measured-engine", "torch-graph"])
    assert r.exit_code == 0 and "65 rows without a power reading" in r.output
