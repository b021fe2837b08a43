"""kfsim plan: its choice meets the latency bound, the memory and the target rate."""
import json

from click.testing import CliRunner

from kfsim.cli import cli
from kfsim.inputs import make_setup
from kfsim.predict import predict


def run(*args):
    return CliRunner().invoke(cli, ["plan", *args])


def test_choice_meets_constraints():
    r = run("--model", "llama-3-8b", "--prompt-len", "1024", "--gen-len", "128", "--target-tokens-per-s", "5000",
            "--max-step-ms", "40", "--gpus", "h100,a100", "--kv-ratio", "1,0.5", "--engine", "ideal", "--tp", "1",
            "--json")
    assert r.exit_code == 0, r.output
    options = json.loads(r.output)
    assert len(options) == 4
    for o in options:
        if not o["feasible"]:
            continue
        assert o["step_ms"] <= 40 + 1e-9
        assert o["gpus_needed"] * o["tokens_per_s_per_gpu"] >= 5000
        s = make_setup(gpu=o["gpu"], model="llama-3-8b", engine="ideal",
                       policy=None if o["kv_ratio"] == 1 else o["policy"], kv_ratio=o["kv_ratio"])
        out = predict(s, o["batch"], 1024 + 127, prompt_len=1024, gen_len=128)
        assert out["request_fits"]
        # one more sequence would break the bound or the memory, or earn fewer tokens/s
        more = predict(s, o["batch"] + 1, 1024 + 127, prompt_len=1024, gen_len=128)
        assert (not more["request_fits"]) or more["step_ms"] > 40 or float(more["request_tokens_per_s"]) <= \
            o["tokens_per_s_per_gpu"] * (1 + 1e-9)
    assert options[0]["feasible"]
    feasible = [o for o in options if o["feasible"]]
    assert options[0]["gpus_needed"] == min(o["gpus_needed"] for o in feasible)


def test_prices_rank_by_cost():
    r = run("--prompt-len", "512", "--gen-len", "64", "--target-tokens-per-s", "1000", "--gpus", "h100,h200",
            "--kv-ratio", "1", "--usd-per-hour", "h100=1,h200=100", "--json")
    options = json.loads(r.output)
    assert options[0]["gpu"] == "h100-sxm"
    costs = [o["usd_per_million_tokens"] for o in options]
    assert costs == sorted(costs)


def test_infeasible_bound_is_explained():
    r = run("--prompt-len", "512", "--gen-len", "64", "--target-tokens-per-s", "10", "--max-step-ms", "0.1",
            "--gpus", "h100", "--kv-ratio", "1")
    assert r.exit_code == 1 and "No option serves" in r.output and "per step" in r.output


def test_bad_price():
    r = run("--prompt-len", "512", "--gen-len", "64", "--target-tokens-per-s", "10", "--usd-per-hour", "h100")
    assert r.exit_code == 2 and "must be GPU=PRICE" in r.output
