"""A decode step by operation group: the model's groups (hand count), the profile file, validate --profile, and
measure's profiler ranges on the CPU (times there are CPU op times: the code is tested, never a figure)."""
import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from kfsim.breakdown import GROUPS, PROFILE_COLUMNS, compare_groups, predicted_groups, read_profile
from kfsim.cli import cli
from kfsim.engine import get_engine
from kfsim.errors import KfsimError
from kfsim.inputs import make_setup
from kfsim.predict import step_time


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_gptj_projections_hand_count():
    """GPT-J-6B, batch 1, ideal engine on an H100 SXM (3.35 TB/s): q, k, v and out are 4 x 4096 x 4096 bf16 per
    layer, 28 layers: 3,758,096,384 bytes, plus 4 x (4096 + 4096) x 2 bytes of activations per layer."""
    s = make_setup(gpu="h100-sxm", model="gpt-j-6b", engine="ideal")
    groups = predicted_groups(step_time(s, 1, 1024))
    moved = 28 * 4 * 4096 * 4096 * 2 + 28 * 4 * 8192 * 2
    assert float(groups["projections"]) == pytest.approx(moved / 3350e9 * 1e3, rel=1e-9)
    assert float(groups["keyformer"]) == 0.0 and float(groups["gaps"]) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("engine", ["default", "compiled", "hf-eager"])
def test_groups_add_up_to_the_step(engine):
    s = make_setup(gpu="h200", model="llama-3-8b", engine=engine, policy="keyformer", kv_ratio=0.5)
    t = step_time(s, np.array([1.0, 16.0]), np.array([2048.0, 2048.0]))
    groups = predicted_groups(t)
    assert np.allclose(sum(groups[g] for g in GROUPS), t.seconds * 1e3)
    assert np.all(groups["keyformer"] > 0) and all(np.all(np.asarray(groups[g]) >= -1e-9) for g in GROUPS)


def _profile(engine="default", scale=1.0):
    """A profile whose groups are the model's own prediction (x scale for the attention group)."""
    s = make_setup(gpu="h200", model="gpt-j-6b", engine=engine, policy="keyformer", kv_ratio=0.5)
    t = step_time(s, 4, 2048)
    groups = predicted_groups(t)
    point = {"gpu": "h200", "model": "gpt-j-6b", "phase": "decode", "engine": "torch-eager", "batch": 4,
             "context": 4096, "kv_ratio": 0.5, "policy": "keyformer", "profiled_step_ms": float(t.seconds) * 1e3,
             "steps": 5, "source": "cuda kernels"}
    return pd.DataFrame([{**point, "group": g, "ms": float(groups[g]) * (scale if g == "attention" else 1.0)}
                         for g in GROUPS])


def test_compare_groups_finds_the_wrong_group(tmp_path):
    exact = compare_groups(_profile(), get_engine("default"))
    assert list(exact["group"]) == list(GROUPS) and np.allclose(exact["error_pct_of_step"], 0, atol=0.02)
    off = compare_groups(_profile(scale=2.0), get_engine("default")).set_index("group")["error_pct_of_step"]
    assert off["attention"] < -1 and (off.drop("attention").abs() < 0.02).all()


def test_a_timed_step_replaces_the_profiled_one():
    """Where the rows timed the point, its step is the timed one and gaps the rest of it after the kernels."""
    p = _profile()
    kernels = p[p["group"] != "gaps"]["ms"].sum()
    timed = p.iloc[:1][["gpu", "model", "phase", "batch", "context", "kv_ratio", "policy"]].assign(
        step_ms=kernels + 1.5)
    cmp = compare_groups(p, get_engine("default"), timed=timed).set_index("group")
    assert (cmp["step"] == "timed").all() and cmp["step_ms"].iloc[0] == pytest.approx(kernels + 1.5, abs=1e-3)
    assert cmp.loc["gaps", "measured_ms"] == pytest.approx(1.5, abs=1e-3)
    assert (compare_groups(p, get_engine("default"), timed=timed.assign(batch=8))["step"] == "profiled").all()


def test_validate_with_a_profile_shows_each_group(tmp_path):
    rows, prof, out = tmp_path / "m.csv", tmp_path / "p.csv", tmp_path / "report"
    p = _profile()
    p.to_csv(prof, index=False)
    point = p.iloc[0]
    pd.DataFrame([{**{k: point[k] for k in ("gpu", "model", "phase", "batch", "context", "kv_ratio", "policy")},
                   "step_ms": point["profiled_step_ms"]}]).to_csv(rows, index=False)
    r = run("validate", str(rows), "--engine", "default", "--profile", str(prof), "--json")
    assert r.exit_code == 0, r.output
    by_op = json.loads(r.output)["by_operation_group"]
    assert [g["group"] for g in by_op] == list(GROUPS)
    r = run("validate", str(rows), "--engine", "default", "--profile", str(prof), "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "by operation group" in r.output and "| keyformer |" not in r.output  # a text table, not markdown
    assert "## By operation group (profiled steps)" in (out / "report.md").read_text()


def test_a_profile_of_two_decoders_gives_the_measured_ones_steps(tmp_path):
    """One file profiling two decoders at the same point (the plain decoder and transformers): validate reports
    the --measured-engine's groups, and without it names the choice in one line (not a traceback)."""
    rows, prof = tmp_path / "m.csv", tmp_path / "p.csv"
    fast, slow = _profile().assign(engine="torch-graph"), _profile(scale=3.0).assign(engine="hf-eager")
    pd.concat([fast, slow]).to_csv(prof, index=False)
    point = fast.iloc[0]
    keys = ("gpu", "model", "phase", "batch", "context", "kv_ratio", "policy")
    pd.DataFrame([{**{k: point[k] for k in keys}, "engine": e, "step_ms": point["profiled_step_ms"]}
                  for e in ("torch-graph", "hf-eager")]).to_csv(rows, index=False)
    for engine, scale in (("torch-graph", 1.0), ("hf-eager", 3.0)):
        r = run("validate", str(rows), "--measured-engine", engine, "--engine", "default", "--profile", str(prof),
                "--json")
        assert r.exit_code == 0, r.output
        att = next(g for g in json.loads(r.output)["by_operation_group"] if g["group"] == "attention")
        assert att["measured_ms"] == pytest.approx(att["predicted_ms"] * scale, rel=1e-3)
    with pytest.raises(KfsimError, match=r"several decoders \(hf-eager, torch-graph\); choose one with "
                                         r"--measured-engine"):
        read_profile(prof)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.drop(columns="group"), "no column group"),
    (lambda d: d.assign(group="matmuls"), "group 'matmuls'; allowed: projections"),
    (lambda d: d.assign(ms=["x"] + [1.0] * (len(d) - 1)), "column ms has a bad value 'x' at row 2"),
    (lambda d: d.assign(ms=[np.nan] + [1.0] * (len(d) - 1)), r"column ms has a bad value \(an empty cell\) at row 2"),
    (lambda d: d.assign(ms=[-1.0] + [1.0] * (len(d) - 1)), "column ms has a bad value -1.0 at row 2; allowed: a "
                                                           "finite number >= 0"),
    (lambda d: d.assign(batch="x"), "column batch has a bad value 'x' at row 2"),
    (lambda d: d.assign(kv_ratio=1.5), "column kv_ratio has a bad value 1.5"),
])
def test_a_bad_profile_is_a_one_line_error(tmp_path, change, message):
    path = tmp_path / "p.csv"
    change(_profile()).to_csv(path, index=False)
    with pytest.raises(KfsimError, match=message):
        read_profile(path)
    assert set(PROFILE_COLUMNS) <= set(_profile().columns) | {"group", "ms"}


def test_measure_profile_refuses_other_decoders(tmp_path):
    pytest.importorskip("torch")
    for other in (["--engine", "compiled"], ["--backend", "hf", "--hf-mode", "compiled"], ["--tp", "2"]):
        r = run("measure", "--out", str(tmp_path / "m.csv"), "--profile", *other)
        assert r.exit_code == 2 and "--profile breaks down eager steps" in r.output, other


@pytest.mark.parametrize("backend", [[], ["--backend", "hf"]])
def test_measure_profile_reaches_the_runner(tmp_path, monkeypatch, backend):
    """--profile is handed to the runner of either backend (the campaign itself needs CUDA: faked here)."""
    torch = pytest.importorskip("torch")
    from measure import campaign, hf_campaign

    made = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    class FakeRunner:
        env = {"gpu_name": "none", "gpu": "none"}

        def __init__(self, **kw):
            made.update(kw)

    monkeypatch.setattr(campaign, "Runner", FakeRunner)
    monkeypatch.setattr(hf_campaign, "HfRunner", FakeRunner)
    monkeypatch.setattr(hf_campaign, "check_installed", lambda: None)
    monkeypatch.setattr(campaign, "run", lambda *a, **kw: [])
    r = run("measure", "--out", str(tmp_path / "m.csv"), "--profile", *backend)
    assert r.exit_code == 0, r.output
    assert made["profile"] is True


@pytest.mark.parametrize("policy", ["full", "keyformer"])
def test_profiler_ranges_charge_every_group_on_the_cpu(policy):
    torch = pytest.importorskip("torch")
    from measure import kv_policies
    from measure.decoder import build
    from measure.profile import profile_step
    from test_measure_cpu import tiny

    w = tiny("llama-3-8b")
    model = build(w, dtype=torch.float32, device="cpu")
    caches = [kv_policies.make_cache(policy, 2, w.n_kv_heads, w.head_dim, 64, 0.5 if policy != "full" else 1.0,
                                     0.3, torch.float32, "cpu") for _ in range(w.n_layers)]
    for c in caches:
        c.fill_random(64)
    tokens = torch.tensor([1, 2])
    scorer = kv_policies.scoring_range
    with torch.inference_mode():
        r = profile_step(model, lambda: model.decode(tokens, torch.tensor(64), caches), steps=3)
    g = r["groups"]
    assert set(g) == set(GROUPS) and all(v >= 0 for v in g.values())
    assert all(g[k] > 0 for k in ("projections", "attention", "ffn", "norms", "positional", "lm_head"))
    assert (g["keyformer"] > 0) == (policy == "keyformer")
    # the ranges are gone once profiled: no hook left on the model, the scorer's range put back
    assert kv_policies.scoring_range is scorer
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
