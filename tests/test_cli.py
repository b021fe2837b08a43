"""The kfsim command: exit codes, one-line errors, JSON fields."""
import json

import pytest
from click.testing import CliRunner

from kfsim.cli import cli

JSON_FIELDS = ["step_ms", "tokens_per_s", "weight_bytes", "kv_bytes", "flops", "memory_bytes", "fits", "bound",
               "speedup_vs_full"]


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_issue_example():
    r = run("predict", "--gpu", "a100", "--seq", "4096", "--kv-ratio", "0.5")
    assert r.exit_code == 0, r.output
    assert "keyformer" in r.output and "tokens/s" in r.output and "ridge point" in r.output


def test_json_fields():
    r = run("predict", "--gpu", "h100", "--model", "llama-3-8b", "--batch", "8", "--seq", "2048", "--kv-ratio",
            "0.5", "--engine", "ideal", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    for key in JSON_FIELDS:
        assert key in out
    assert out["policy"] == "keyformer" and out["fits"] is True and out["speedup_vs_full"] > 1


def test_request_json():
    r = run("predict", "--gpu", "h200", "--scenario", "summarization", "--kv-ratio", "0.5", "--json")
    out = json.loads(r.output)
    assert out["ttft_ms"] > 0 and out["total_ms"] > out["ttft_ms"] and out["seq"] == 1920 + 128 - 1


def test_hw_and_workload_files(tmp_path):
    from kfsim import catalog

    r = run("predict", "--hw", str(catalog.shipped_files("gpu")["l4"]), "--workload",
            str(catalog.shipped_files("model")["llama-2-7b"]), "--seq", "100", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["gpu"] == "l4"


@pytest.mark.parametrize("args, message", [
    (["--gpu", "h10", "--seq", "5"], "unknown gpu 'h10' (did you mean 'h100'?)"),
    (["--gpu", "h100", "--seq", "5", "--kv-ratio", "0"], "'--kv-ratio': 0 is out of range"),
    (["--gpu", "h100", "--seq", "5", "--kv-ratio", "abc"], "'abc' is not a valid float"),
    (["--gpu", "h100", "--seq", "-3"], "'--seq'"),
    (["--gpu", "h100", "--seq", "5", "--policy", "h3o"], "'h3o' is not one of"),
    (["--gpu", "h100", "--seq", "5", "--kv-dtype", "int3"], "unknown KV dtype 'int3'; allowed: fp32, bf16"),
    (["--gpu", "h100", "--seq", "5", "--policy", "full", "--kv-ratio", "0.5"], "policy full keeps the whole cache"),
    (["--gpu", "h100"], "give --seq N"),
    (["--seq", "5"], "give --gpu NAME"),
    (["--gpu", "h100", "--hw", "x.yaml", "--seq", "5"], "either --gpu or --hw"),
    (["--gpu", "h100", "--seq", "5", "--engine", "fast"], "unknown engine 'fast'"),
    (["--gpu", "h100", "--seq", "5", "--prompt-len", "10"], "needs both --prompt-len and --gen-len"),
    (["--gpu", "h100", "--seq", "5", "--scenario", "poetry"], "has no scenario 'poetry'"),
    (["--gpu", "h100", "--seq", "5", "--hw-file", "x"], "No such option '--hw-file'"),
])
def test_errors_are_one_line(args, message):
    r = run("predict", *args)
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    assert message in lines[0]
    assert "Traceback" not in r.output


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text("name: g\nmemory_gb: [1,\n")
    r = run("predict", "--hw", str(p), "--seq", "5")
    assert r.exit_code == 2 and r.output.startswith(f"Error: {p}: not valid YAML")


@pytest.mark.parametrize("what, expect", [("gpus", "h100-sxm"), ("models", "llama-3-8b"), ("engines", "ideal")])
def test_list(what, expect):
    r = run("list", what)
    assert r.exit_code == 0 and expect in r.output
    r = run("list", what, "--json")
    assert any(row["name"] == expect for row in json.loads(r.output))


def test_help_explains_flags():
    r = run("predict", "--help")
    assert r.exit_code == 0
    for flag in ("--gpu", "--seq", "--kv-ratio", "--policy", "--engine", "--kv-dtype", "--json"):
        assert flag in r.output


def test_measure_without_cuda_says_so_in_one_line(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    for args in (["measure", "--out", str(tmp_path / "m.csv")], ["microbench", "--out", str(tmp_path / "b.csv")]):
        r = run(*args)
        assert r.exit_code == 2 and r.output.startswith("Error: ") and "CUDA" in r.output
        assert len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--batch", "1,x"], "--batch: 'x' is not a number"),
    (["--model", "gpt-z"], "--model: 'gpt-z' is not allowed"),
    (["--kv-ratio", "1.5"], "--kv-ratio: 1.5 is out of range"),
    (["--policy", "full", "--kv-ratio", "0.5"], "no points to measure"),
    (["--eager", "--engine", "compiled"], "does not combine with --engine compiled"),
    (["--engine", "compiled", "--kernel-options", "write_first"], "No such option '--kernel-options'"),
    (["--tp", "2", "--prefill", "512"], "does not combine with --backend hf, --engine compiled or --prefill"),
    (["--tp", "2", "--engine", "compiled"], "does not combine with"),
    (["--model", "cerebras-gpt-111m", "--tp", "8"], "--tp 8: model cerebras-gpt-111m has 12 attention heads"),
    (["--tp", "3"], "'3' is not one of '1', '2', '4', '8'"),
    (["--backend", "hf", "--engine", "compiled"], "with --backend hf use --hf-mode"),
    (["--backend", "hf", "--eager"], "with --backend hf use --hf-mode"),
    (["--hf-mode", "compiled"], "are options of --backend hf"),
    (["--backend", "hf", "--checkpoint", ""], "--checkpoint '': not a folder"),
    (["--backend", "vllm"], "'vllm' is not one of 'kfsim', 'hf'"),
])
def test_measure_bad_flags(tmp_path, args, message):
    pytest.importorskip("torch")
    r = run("measure", "--out", str(tmp_path / "m.csv"), *args)
    assert r.exit_code == 2 and message in r.output, r.output


def test_measure_help_says_where_the_kernel_features_are_named():
    from measure.kernel_options import KERNEL_FEATURES, recorded

    r = run("measure", "--help")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # click wraps the help
    assert "kernel_options" in text and "measure/kernel_options.py" in text, text
    assert recorded().split("+") == sorted(KERNEL_FEATURES) and "alibi" in KERNEL_FEATURES


def test_measure_hf_without_transformers_says_so(tmp_path, monkeypatch):
    import importlib.util

    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    r = run("measure", "--out", str(tmp_path / "m.csv"), "--backend", "hf")
    assert r.exit_code == 2 and "needs transformers" in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_measure_compiled_without_triton_says_so(tmp_path, monkeypatch):
    import importlib.util

    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    r = run("measure", "--out", str(tmp_path / "m.csv"), "--engine", "compiled")
    assert r.exit_code == 2 and "needs triton" in r.output and len(r.output.strip().splitlines()) == 1, r.output
