"""What the CLI prints explains itself: a slower policy says why, Keyformer shows its memory dividend, the engine
line says what it was fitted on and where it extrapolates, tables fit 100 columns, report figures show only what
fits and say what they show."""
import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

from kfsim.cli import cli
from kfsim.inputs import make_setup
from kfsim.predict import largest_batch, predict
from kfsim.report import _fitting


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_a_slower_policy_says_which_term_grew():
    r = run("predict", "--gpu", "a100", "--seq", "4096", "--kv-ratio", "0.5")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "(slower)" in text and "why slower" in text and "fixed overhead +" in text
    assert "more kernels per step" in text


def test_a_faster_policy_has_no_excuse_line():
    r = run("predict", "--gpu", "h100", "--model", "gpt-j-6b", "--batch", "16", "--seq", "16384", "--kv-ratio", "0.2")
    assert r.exit_code == 0, r.output
    assert "x speedup" in r.output and "why slower" not in r.output


def test_keyformer_shows_the_largest_batch_for_both_policies():
    r = run("predict", "--gpu", "a100", "--seq", "4096", "--kv-ratio", "0.5", "--json")
    out = json.loads(r.output)
    assert out["max_batch"] > out["full_max_batch"] > 0
    assert out["max_batch_tokens_per_s"] > out["full_max_batch_tokens_per_s"] > 0
    text = run("predict", "--gpu", "a100", "--seq", "4096", "--kv-ratio", "0.5").output
    assert f"largest batch   {out['max_batch']} sequences" in text
    assert f"vs full cache {out['full_max_batch']} (" in text


def test_largest_batch_is_the_memory_limit():
    s = make_setup(gpu="h100", model="llama-3-8b", engine="default", policy="keyformer", kv_ratio=0.2)
    lb = largest_batch(s, 8192)
    assert bool(predict(s, lb["max_batch"], 8192)["fits"]) and not bool(predict(s, lb["max_batch"] + 1, 8192)["fits"])
    full = s.with_policy(s.policy.__class__("full"))
    assert bool(predict(full, lb["full_max_batch"], 8192)["fits"])
    assert not bool(predict(full, lb["full_max_batch"] + 1, 8192)["fits"])


@pytest.mark.parametrize("gpu, extrapolated", [("h100", False), ("a100", True), ("h200", True)])
def test_engine_line_says_where_it_was_measured(gpu, extrapolated):
    r = run("predict", "--gpu", gpu, "--seq", "2048")
    assert "engine default: fitted on h100-sxm" in r.output
    assert ("extrapolated: not measured on this GPU" in " ".join(r.output.split())) == extrapolated


@pytest.mark.parametrize("gpu, extrapolated", [("h100", False), ("h200", False), ("a100", True)])
def test_an_engine_fitted_on_two_gpus_is_measured_on_both(gpu, extrapolated):
    r = run("predict", "--gpu", gpu, "--seq", "2048", "--engine", "hf-compiled")
    assert "fitted on h100-sxm, h200" in r.output
    assert ("extrapolated: not measured on this GPU" in " ".join(r.output.split())) == extrapolated


@pytest.mark.parametrize("model, policy, warned", [("mistral-7b", "full", True), ("mistral-7b", "keyformer", False),
                                                    ("llama-3-8b", "full", False)])
def test_a_measured_miss_is_said_beside_the_predictions_it_covers(model, policy, warned):
    """hf-compiled's terms describe replayed CUDA graphs; a sliding-window full cache replays none (measured)."""
    r = run("predict", "--gpu", "h200", "--model", model, "--seq", "1024", "--engine", "hf-compiled",
            "--policy", policy, "--kv-ratio", "1" if policy == "full" else "0.5", "--json")
    notes = " ".join(json.loads(r.output)["notes"])
    assert ("records no CUDA graph for a sliding-window model's full static cache" in notes) == warned


@pytest.mark.parametrize("args, warned", [
    (["--policy", "keyformer", "--kv-ratio", "0.5", "--prompt-len", "128", "--gen-len", "16"], True),
    (["--policy", "keyformer", "--kv-ratio", "0.5", "--prompt-len", "2048", "--gen-len", "16"], False),
    (["--policy", "keyformer", "--kv-ratio", "0.5", "--seq", "128"], False),
    (["--prompt-len", "128", "--gen-len", "16"], False)])
def test_a_measured_short_prompt_miss_is_said_beside_its_time_to_first_token(args, warned):
    """hf-eager's Keyformer prefill of a short prompt took up to twice its prediction (measured, H100): said where
    that time to first token is priced, and nowhere else."""
    r = run("predict", "--gpu", "h100", "--model", "llama-3-8b", "--engine", "hf-eager", *args, "--json")
    notes = " ".join(json.loads(r.output)["notes"])
    assert ("a Keyformer cache's prefill of a prompt of at most 512 tokens" in notes) == warned


def test_simulate_says_a_short_prompt_miss_for_its_shortest_prompt():
    phrase = "prefill of a prompt of at most 512 tokens"
    for prompt, warned in ((256, True), (4096, False)):
        sim = CliRunner().invoke(cli, ["simulate", "--gpu", "h100", "--model", "llama-3-8b", "--engine", "hf-eager",
                                       "--policy", "keyformer", "--kv-ratio", "0.5", "--rate", "1", "--requests", "10",
                                       "--prompt-len", str(prompt), "--gen-len", "8", "--json"])
        assert sim.exit_code == 0, sim.output
        assert (phrase in " ".join(json.loads(sim.stdout)["notes"])) == warned


def test_sweep_plan_and_simulate_say_the_caveats_that_cover_them():
    """The note reaches every command that prices a covered point, on stderr where stdout is a table or JSON."""
    runner = CliRunner()
    phrase = "records no CUDA graph"
    sweep = runner.invoke(cli, ["sweep", "--gpu", "h200", "--model", "mistral-7b,llama-3-8b", "--engine", "hf-compiled",
                                "--batch", "1", "--seq", "1024", "--kv-ratio", "1,0.5"])
    assert sweep.exit_code == 0 and phrase in " ".join(sweep.stderr.split()) and phrase not in sweep.stdout
    from kfsim.sweep import sweep as sweep_points

    df = sweep_points(["h200"], ["mistral-7b", "llama-3-8b"], [1], [1024], kv_ratios=[1, 0.5], engines=["hf-compiled"])
    assert df.loc[df["caveat"], ["model", "policy"]].drop_duplicates().values.tolist() == [["mistral-7b", "full"]]
    plan = runner.invoke(cli, ["plan", "--model", "mistral-7b", "--prompt-len", "1024", "--gen-len", "64",
                               "--target-tokens-per-s", "1000", "--engine", "hf-compiled", "--gpus", "h200", "--json"])
    assert plan.exit_code == 0 and phrase in " ".join(plan.stderr.split())
    json.loads(plan.stdout)
    sim = runner.invoke(cli, ["simulate", "--gpu", "h200", "--model", "mistral-7b", "--engine", "hf-compiled",
                              "--rate", "1", "--requests", "20", "--prompt-len", "512", "--gen-len", "16", "--json"])
    assert sim.exit_code == 0 and phrase in " ".join(json.loads(sim.stdout)["notes"])
    quiet = runner.invoke(cli, ["plan", "--model", "llama-3-8b", "--prompt-len", "1024", "--gen-len", "64",
                                "--target-tokens-per-s", "1000", "--engine", "hf-compiled", "--gpus", "h200"])
    assert quiet.exit_code == 0 and phrase not in quiet.output


@pytest.mark.parametrize("engine, request_args, warned", [
    ("hf-compiled", ("--prompt-len", "1024", "--gen-len", "64"), True),
    ("hf-compiled", ("--seq", "1024"), False),  # a decode step alone: no prefill priced
    ("default", ("--prompt-len", "1024", "--gen-len", "64"), False),  # fitted on 18 prefill rows
    ("ideal", ("--prompt-len", "1024", "--gen-len", "64"), False)])  # says it is the roofline already
def test_time_to_first_token_of_an_engine_without_prefill_rows_is_called_a_lower_bound(engine, request_args, warned):
    r = run("predict", "--gpu", "h200", "--model", "llama-3-8b", "--engine", engine, *request_args, "--json")
    notes = " ".join(json.loads(r.output)["notes"])
    assert ("fitted on no prefill rows: its prefill runs at the datasheet's FLOP/s" in notes) == warned


def test_an_engine_reads_back_the_phases_it_was_fitted_on():
    from kfsim.engine import get_engine

    assert get_engine("default").fitted_phases == {"decode", "prefill"}
    assert get_engine("hf-eager").fitted_phases == {"decode", "prefill"}
    assert get_engine("hf-compiled").fitted_phases == {"decode"}
    assert get_engine("ideal").fitted_phases == set()
    assert dataclasses.replace(get_engine("ideal"), fitted_on="our lab's H100 (by hand)").fitted_phases == set()


def test_ideal_engine_says_it_is_not_fitted():
    r = run("predict", "--gpu", "h100", "--seq", "2048", "--engine", "ideal")
    assert "engine ideal: pure roofline" in r.output


@pytest.mark.parametrize("args", [("predict", "--gpu", "a100", "--seq", "4096", "--kv-ratio", "0.5"),
                                  ("list", "gpus"), ("list", "models"), ("list", "engines")])
def test_tables_fit_100_columns(args):
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert max(len(line) for line in r.output.splitlines()) <= 100


def test_list_json_keeps_whole_fields():
    rows = json.loads(run("list", "engines", "--json").output)
    default = next(r for r in rows if r["name"] == "default")
    assert default["fitted_on"].startswith("h100-sxm") and default["description"].startswith("fitted by kfsim")


def test_bound_wording_is_one_verdict():
    r = run("predict", "--gpu", "h200", "--engine", "compiled", "--model", "llama-3-8b", "--batch", "64", "--seq",
            "16384", "--kv-ratio", "0.2")
    assert "memory side" not in r.output and "compute side" not in r.output
    assert "bound by        memory traffic" in r.output or "bound by        compute" in r.output


def test_report_blanks_what_does_not_fit():
    out = {"fits": np.array([True, False]), "step_ms": np.array([1.0, 2.0])}
    v = _fitting(out, "step_ms")
    assert v[0] == 1.0 and np.isnan(v[1])


def test_report_figures_have_a_sentence(tmp_path):
    r = run("report", "--model", "llama-3-8b", "--gpus", "l4", "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    md = (tmp_path / "report.md").read_text().split("\n## ")[1:]
    assert len(md) == 7
    for section in md:
        figure, caption = section.split(".png)", 1)
        assert len(caption.strip().split()) >= 12, figure
