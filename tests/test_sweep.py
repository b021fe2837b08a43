"""A sweep's rows equal single predictions; lists and ranges parse; bad lists get one-line errors."""
import numpy as np
import pytest
from click.testing import CliRunner

from kfsim.cli import cli
from kfsim.errors import KfsimError
from kfsim.inputs import make_setup
from kfsim.predict import predict
from kfsim.sweep import combos, sweep
from kfsim.values import parse_list


def test_rows_equal_single_predictions():
    df = sweep(["h100", "a100"], ["gpt-j-6b", "llama-3-8b"], [1, 8, 33], [512, 4096], kv_ratios=[1, 0.5],
               policies=["keyformer", "window"])
    assert len(df) == 2 * 2 * 3 * 2 * 3  # 3 policy settings: full, keyformer 0.5, window 0.5
    for row in df.sample(12, random_state=0).itertuples():
        s = make_setup(gpu=row.gpu, model=row.model, policy=row.policy, kv_ratio=row.kv_ratio)
        one = predict(s, row.batch, row.seq)
        for key in ("step_ms", "tokens_per_s", "kv_bytes", "memory_bytes", "speedup_vs_full"):
            assert getattr(row, key) == pytest.approx(float(one[key]), rel=1e-12)
        assert row.fits == bool(one["fits"])


def test_combos_and_ranges():
    assert combos(["keyformer", "full"], [1, 0.5]) == [("full", 1.0), ("keyformer", 0.5)]
    assert parse_list("256:1024:256", "seq") == [256, 512, 768, 1024]
    assert parse_list("1,8,32", "batch") == [1, 8, 32]
    with pytest.raises(KfsimError, match="start:stop:step"):
        parse_list("1:2", "seq")
    with pytest.raises(KfsimError, match="--batch: 0 is out of range"):
        parse_list("0,1", "batch", lo=1)


def test_cli_writes_csv(tmp_path):
    out = tmp_path / "s.csv"
    r = CliRunner().invoke(cli, ["sweep", "--gpu", "h100,h200", "--seq", "1024:4096:1024", "--batch", "1,4",
                                 "--kv-ratio", "1,0.2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    import pandas as pd

    df = pd.read_csv(out)
    assert len(df) == 2 * 4 * 2 * 2 and {"step_ms", "fits", "bound", "speedup_vs_full"} <= set(df.columns)
    assert np.all(df.loc[df.policy == "full", "speedup_vs_full"] == 1)


@pytest.mark.parametrize("args, message", [
    (["--seq", "10:5:1"], "stop >= start"),
    (["--seq", "100", "--gpu", "h999"], "unknown gpu 'h999'"),
    (["--seq", "100", "--out", "x.txt"], "use a .csv or .parquet"),
])
def test_cli_errors(args, message):
    r = CliRunner().invoke(cli, ["sweep", *args])
    assert r.exit_code == 2 and message in r.output and r.output.startswith("Error:")
