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


def test_plan_by_rate_simulates_and_keyformer_buys_gpus_where_memory_limits():
    """Llama-3-8B, 8k prompts, 20 requests/s within p90 TTFT 2 s and TPOT 50 ms (ideal engine): the full cache's
    batch is held by memory, Keyformer at 0.2 holds five times the sequences, so it needs fewer GPUs."""
    r = run("--model", "llama-3-8b", "--prompt-len", "8192", "--gen-len", "512", "--rate", "20", "--max-ttft-ms",
            "2000", "--max-tpot-ms", "50", "--gpus", "h100", "--usd-per-hour", "h100=2.5", "--engine", "ideal",
            "--json")
    assert r.exit_code == 0, r.output
    options = [o for o in json.loads(r.output) if o["feasible"]]
    assert options and all(o["ttft_p90_ms"] <= 2000 and o["tpot_p90_ms"] <= 50 for o in options)
    assert all(o["replicas"] * o["rate_per_replica"] >= 20 and o["gpus_needed"] == o["replicas"] * o["tp"]
               for o in options)
    best_full = min(o["usd_per_hour"] for o in options if o["policy"] == "full")
    best_kf = min(o["usd_per_hour"] for o in options if o["policy"] == "keyformer")
    assert best_kf < best_full and options[0]["policy"] == "keyformer"


def test_plan_by_rate_says_why_nothing_serves():
    r = run("--model", "llama-3-8b", "--prompt-len", "8192", "--gen-len", "64", "--rate", "1", "--max-ttft-ms",
            "1", "--gpus", "h100", "--kv-ratio", "1", "--tp", "1")
    text = " ".join(r.output.split())
    assert r.exit_code == 1 and "No option serves" in text and "misses the targets" in text, r.output


def test_plan_needs_one_target():
    for args, text in ((["--rate", "1", "--target-tokens-per-s", "10"], "give either"), ([], "give either"),
                       (["--target-tokens-per-s", "10", "--max-ttft-ms", "5"], "go with --rate")):
        r = run("--prompt-len", "8", "--gen-len", "8", *args)
        assert r.exit_code == 2 and text in r.output, r.output
