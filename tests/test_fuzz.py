"""The CLI fuzzed: whatever a user types, kfsim answers with finite numbers (exit 0) or one `Error:` line (exit 2),
never a traceback, NaN or a half-written file."""
import json
import math

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kfsim.catalog import names
from kfsim.cli import cli

#: values a careless or unlucky user types for a number
NUMBERS = st.one_of(
    st.integers(-10, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", " ", "nan", "inf", "-inf", "1e30", "1e400", "0x10", "1,2", "1:5:1", "5:1:1", "abc", "½",
                     "1.0000001", "0.0", "-0", "9" * 30]))
NAMES = st.one_of(st.sampled_from(names("gpu") + names("model") + ["", " ", "h1OO", "../x", "a100,h100"]),
                  st.text(max_size=12))


def _finite(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def check(args):
    r = CliRunner().invoke(cli, args)
    assert "Traceback" not in r.output, (args, r.output)
    assert r.exception is None or isinstance(r.exception, SystemExit), (args, r.exception)
    if r.exit_code == 0 or (r.exit_code == 1 and args[0] == "plan"):  # plan: 1 where no option serves
        out = json.loads(r.stdout)
        assert _finite(out), (args, out)
        if r.exit_code == 1:
            assert not any(o["feasible"] for o in out) and all(o["step_ms"] is None for o in out if "step_ms" in o)
    else:
        assert r.exit_code == 2, (args, r.output)
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and "nan" not in lines[0].split(":", 1)[0], \
            (args, r.output)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gpu=NAMES, model=NAMES, batch=NUMBERS, seq=NUMBERS, ratio=NUMBERS, tp=NUMBERS)
def test_predict_fuzz(gpu, model, batch, seq, ratio, tp):
    check(["predict", "--json", "--gpu", gpu, "--model", model, "--batch", batch, "--seq", seq, "--kv-ratio", ratio,
           "--tp", tp])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=NUMBERS, seq=NUMBERS, ratio=NUMBERS, prompt=NUMBERS, gen=NUMBERS)
def test_request_fuzz(batch, seq, ratio, prompt, gen):
    check(["predict", "--json", "--gpu", "h100", "--model", "llama-3-8b", "--batch", batch, "--kv-ratio", ratio,
           "--prompt-len", prompt, "--gen-len", gen])


@pytest.mark.parametrize("gpu", names("gpu"))
def test_every_shipped_gpu_and_model_answers_with_finite_numbers(gpu):
    for model in names("model"):
        r = CliRunner().invoke(cli, ["predict", "--gpu", gpu, "--model", model, "--seq", "2048", "--json"])
        assert r.exit_code == 0, (gpu, model, r.output)
        assert _finite(json.loads(r.stdout)), (gpu, model)



def _one_flag_fuzzed(base: dict, flag: str, value: str) -> list:
    """`base` flags as a command line, one of them replaced by a fuzzed value (so the others stay valid and the
    command gets past them)."""
    flags = {**base, flag: value}
    return [a for k, v in flags.items() for a in (k, v)]


PLAN = {"--gpus": "h100,a100", "--prompt-len": "512", "--gen-len": "128", "--target-tokens-per-s": "2000",
        "--max-step-ms": "80", "--kv-ratio": "0.5", "--usd-per-hour": "h100=2.5", "--tp": "1,2"}
SIMULATE = {"--gpu": "h100", "--rate": "5", "--prompt-len": "256", "--gen-len": "32",
            "--max-batch": "16", "--chunk-tokens": "512", "--slo-ttft-ms": "500", "--kv-ratio": "0.5", "--seed": "1"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flag=st.sampled_from(sorted(PLAN)), value=NUMBERS)
def test_plan_fuzz(flag, value):
    check(["plan", "--json", "--policy", "keyformer"] + _one_flag_fuzzed(PLAN, flag, value))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flag=st.sampled_from(sorted(SIMULATE)), value=NUMBERS)
def test_simulate_fuzz(flag, value):
    check(["simulate", "--json", "--policy", "keyformer", "--requests", "20"] + _one_flag_fuzzed(SIMULATE, flag, value))
