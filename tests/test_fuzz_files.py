"""Saved files fuzzed: any value in a GPU, model or engine YAML field, or in a measurement CSV cell, gives finite
numbers (exit 0) or one `Error:` line (exit 2) naming the file, never a traceback, and leaves the inputs unchanged."""
import csv
import io
import json
import tempfile
import warnings
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kfsim.cli import cli
from test_fuzz import _finite

ROOT = Path(__file__).resolve().parents[1]

#: what a careless edit puts in a YAML field
YAML_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70), st.booleans(), st.none(),
    st.text(max_size=8), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                      st.integers(), max_size=2),
    st.sampled_from([0, -1, 1e-300, 1e300, "", "1e3", "fp16", "bf16"]))
#: what a careless edit (or a broken writer) puts in a CSV cell
CELLS = st.one_of(
    st.sampled_from(["", " ", "nan", "inf", "-inf", "-1", "0", "1.5", "1e400", "9" * 30, "abc", "ok", "oom",
                     "decode", "prefill", "full", "keyformer", "h100-sxm", "a\nb", '"', ","]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-10, 10**20).map(str), st.text(max_size=6))


def _leaves(data, prefix=()):
    """Paths to every scalar in a YAML mapping (nested mappings included)."""
    for k, v in data.items():
        if isinstance(v, dict):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,)


def _set(data, path, value):
    for k in path[:-1]:
        data = data[k]
    data[path[-1]] = value


def check(args, inputs=()):
    before = {p: p.read_bytes() for p in inputs}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a NaN computed from a bad value is a bug, not a warning
        r = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in r.output, (args, r.output)
    assert r.exception is None or isinstance(r.exception, SystemExit), (args, repr(r.exception))
    if r.exit_code == 0:
        assert _finite(json.loads(r.stdout)), (args, r.stdout)
    else:
        lines = r.output.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), (args, r.output)
        assert "np.float" not in lines[0] and "np.int" not in lines[0], lines[0]  # no numpy reprs in messages
    for p, data in before.items():
        assert p.read_bytes() == data, f"{p} changed"
    return r


def _yaml_case(shipped):
    data = yaml.safe_load(shipped.read_text())
    return st.tuples(st.sampled_from(sorted(_leaves(data))), YAML_VALUES)


#: a shipped file of each kind, the flag that reads it, and the flags that complete a prediction
FILES = [
    (ROOT / "hw_profiles" / "h100-sxm.yaml", "--hw", []),
    (ROOT / "engines" / "hf-eager.yaml", "--engine", ["--gpu", "h100", "--policy", "keyformer", "--kv-ratio", "0.5"]),
    (ROOT / "workloads" / "llama-3-8b.yaml", "--workload", ["--gpu", "h100", "--batch", "4"]),
]


@pytest.mark.parametrize("shipped, flag, args", FILES, ids=[f[1] for f in FILES])
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_yaml_fields_fuzzed(shipped, flag, args, data):
    path_in_yaml, value = data.draw(_yaml_case(shipped))
    fields = yaml.safe_load(shipped.read_text())
    _set(fields, path_in_yaml, value)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / shipped.name
        path.write_text(yaml.safe_dump(fields), encoding="utf-8")
        r = check(["predict", "--json", "--seq", "2048", flag, path] + args, [path])
        if r.exit_code == 2:
            assert str(path) in r.output or "--" in r.output, r.output  # the message names the file (or the flag)


ROWS = ROOT / "data" / "h100-sxm-plain" / "rows.csv"


def _rows():
    with ROWS.open(newline="") as f:
        return list(csv.reader(f))[:25]


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(row=st.integers(1, 24), column=st.sampled_from(_rows()[0]), cell=CELLS)
def test_measurement_cells_fuzzed(row, column, cell):
    with tempfile.TemporaryDirectory() as tmp:  # one folder per example: a report left by another would hide one
        _fuzz_cell(Path(tmp), row, column, cell)


def _with_cell(folder: Path, row, column, cell) -> Path:
    """The first rows of a real measurement file, one cell replaced, saved as `folder`/m.csv."""
    rows = _rows()
    rows[row][rows[0].index(column)] = cell
    path = folder / "m.csv"
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    path.write_text(text.getvalue(), encoding="utf-8")
    return path


def _fuzz_cell(tmp_path, row, column, cell):
    path = _with_cell(tmp_path, row, column, cell)
    out = tmp_path / "report"
    r = check(["validate", path, "--engine", "default", "--measured-engine", "torch-graph", "--json", "--out", out],
              [path])
    if r.exit_code == 2:
        assert not out.exists(), "a failed validate left output behind"


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(row=st.integers(1, 24), column=st.sampled_from(["power_w", "mem_used_gb", "window", "step_ms", "dtype"]),
       cell=CELLS)
def test_calibration_cells_fuzzed(row, column, cell):
    """calibrate reads the power and memory columns that validate does not."""
    with tempfile.TemporaryDirectory() as tmp:
        path = _with_cell(Path(tmp), row, column, cell)
        out = Path(tmp) / "e.yaml"
        r = check(["calibrate", path, "--measured-engine", "torch-graph", "--json", "--out", out], [path])
        if r.exit_code == 2:
            assert not out.exists(), "a failed calibrate left an engine behind"
