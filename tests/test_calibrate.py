"""Calibration recovers a known engine from synthetic measurements; bad files get one-line errors; validate works."""
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from kfsim import calibrate, measurements
from kfsim.cli import cli
from kfsim.engine import IDEAL, get_engine
from kfsim.errors import KfsimError
from kfsim.inputs import make_setup
from kfsim.predict import predict, step_time
from kfsim.rows import predict_frame

TRUE = dataclasses.replace(
    IDEAL, name="true", weight_bandwidth_fraction=0.8, kv_bandwidth_fraction=0.7, kernel_overhead_us=2.0,
    layer_overhead_us=40.0, step_overhead_us=50.0, kernels_per_op={"keyformer": 20.0}, keyformer_logit_passes=10.0,
    attention_saturation_items=64.0, attention_split_tokens=512.0, evicting_attention_split_tokens=4096.0,
    gemm_compute_fraction=0.6, attention_compute_fraction=0.4, prefill_kernel_overhead_us=6.0,
    keyformer_prefill_logit_passes=8.0)


def synthetic(engine=TRUE, gpu="h100-sxm", models=("gpt-j-6b", "llama-3-8b"), prefill_batches=(1,)):
    rows = []
    for model in models:
        for policy, ratio in (("full", 1.0), ("keyformer", 0.5), ("keyformer", 0.2)):
            for b in (1, 4, 16, 64):
                for c in (1024, 4096, 16384):
                    rows.append(dict(gpu=gpu, model=model, batch=b, context=c, kv_ratio=ratio, policy=policy,
                                     phase="decode"))
            for p in (512, 2048, 8192):
                rows += [dict(gpu=gpu, model=model, batch=b, context=p, kv_ratio=ratio, policy=policy,
                              phase="prefill") for b in prefill_batches]
    df = pd.DataFrame(rows)
    df["step_ms"] = predict_frame(df, engine)
    return df


def test_recovers_a_known_engine():
    df = synthetic()
    f = calibrate.fit(df, "recovered")
    assert f.mape < 0.5
    assert f.engine.weight_bandwidth_fraction == pytest.approx(0.8, rel=0.05)
    assert f.engine.kv_bandwidth_fraction == pytest.approx(0.7, rel=0.05)
    assert f.engine.gemm_compute_fraction == pytest.approx(0.6, rel=0.1)
    # and it predicts another GPU about as the true engine does (fixed costs and bandwidth trade off a little)
    other = synthetic(gpu="h200")
    err = np.abs(predict_frame(other, f.engine) / other["step_ms"] - 1)
    assert err.mean() < 0.02 and err.max() < 0.06


def test_fit_is_deterministic():
    df = synthetic()
    assert calibrate.fit(df, "a").fitted == calibrate.fit(df, "a").fitted


def test_too_few_rows():
    df = synthetic().head(5)
    with pytest.raises(KfsimError, match="too few to fit"):
        calibrate.fit(df, "x")


def test_ceilings_cap_fractions():
    micro = pd.DataFrame({"bench": ["skinny_gemm", "sdpa_decode"], "gbps": [2680.0, 3015.0]})
    from kfsim.hardware import get_hardware

    caps = calibrate.ceilings(micro, get_hardware("h100"))
    assert caps == pytest.approx({"weight_bandwidth_fraction": 0.8, "matvec_bandwidth_fraction": 0.8,
                                  "kv_bandwidth_fraction": 0.9})
    f = calibrate.fit(synthetic(dataclasses.replace(TRUE, weight_bandwidth_fraction=0.95)), "c", bounds=caps)
    assert f.engine.weight_bandwidth_fraction <= 0.8 + 1e-9


#: a stack with fused matrix-vector kernels at batch 1 (faster streaming, no norm or elementwise launches there)
MATVEC = dataclasses.replace(TRUE, matvec_max_batch=1.0, matvec_bandwidth_fraction=0.9,
                             matvec_kernels_per_op={"gemm": 0.5, "norm": 0.0, "elementwise": 0.25})


def test_recovers_matrix_vector_kernels():
    # two 6-8B models alone trade the matrix-vector bandwidth against its kernel counts (within 0.1 % of the
    # steps); a small model, whose batch-1 step is mostly fixed cost, tells them apart
    f = calibrate.fit(synthetic(MATVEC, models=("gpt-j-6b", "llama-3-8b", "cerebras-gpt-1.3b")), "mv",
                      matvec_max_batch=1)
    assert f.mape < 0.5
    assert f.engine.matvec_max_batch == 1
    assert f.engine.matvec_bandwidth_fraction == pytest.approx(0.9, rel=0.05)
    assert f.engine.weight_bandwidth_fraction == pytest.approx(0.8, rel=0.05)


def test_without_matvec_rows_matvec_is_not_fitted():
    df = synthetic(MATVEC)
    f = calibrate.fit(df[df["batch"] > 1], "mv", matvec_max_batch=1)
    assert not any(k.startswith("matvec") for k in f.fitted)
    assert "matvec_bandwidth_fraction" not in calibrate.fit(df, "plain").fitted  # no --matvec-max-batch


def write(tmp_path, df, name="m.csv"):
    p = tmp_path / name
    df.to_csv(p, index=False)
    return str(p)


def run(*args):
    return CliRunner().invoke(cli, list(args))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.drop(columns=["step_ms"]), "missing required column(s) step_ms"),
    (lambda d: d.assign(gpu="h300"), "unknown gpu 'h300'"),
    (lambda d: d.assign(model="gpt-k"), "unknown model 'gpt-k'"),
    (lambda d: d.assign(batch="x"), "column batch has a bad value 'x'"),
    (lambda d: d.assign(phase="train"), "phase 'train'"),
    (lambda d: d.head(4), "too few to fit"),
])
def test_calibrate_refuses_bad_files(tmp_path, edit, message):
    p = write(tmp_path, edit(synthetic()))
    r = run("calibrate", p, "--out", str(tmp_path / "e.yaml"))
    assert r.exit_code == 2, r.output
    assert r.output.startswith("Error: ") and message in r.output and len(r.output.strip().splitlines()) == 1


def test_calibrate_then_validate_cli(tmp_path):
    p = write(tmp_path, synthetic())
    out = tmp_path / "fitted.yaml"
    r = run("calibrate", p, "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "in-sample MAPE" in r.output and get_engine(str(out)).name == "fitted"
    r = run("validate", p, "--engine", str(out), "--json", "--out", str(tmp_path / "rep"))
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)
    assert {"mape", "median_ape", "max_ape", "n"} <= set(m) and m["n"] == 90 and m["mape"] < 1
    for f in ("report.md", "rows.csv", "predicted_vs_measured.png", "error_vs_context.png", "error_vs_batch.png"):
        assert (tmp_path / "rep" / f).exists()
    r = run("predict", "--gpu", "h200", "--seq", "4096", "--engine", str(out), "--json")
    assert r.exit_code == 0 and json.loads(r.output)["engine"] == "fitted"


def test_an_engine_says_which_policies_it_was_fitted_on(tmp_path):
    """A prediction for a policy the engine saw no rows of says so (its scorer terms are starting values)."""
    df = synthetic()
    out = tmp_path / "full-only.yaml"
    r = run("calibrate", write(tmp_path, df[df["policy"] == "full"]), "--out", str(out))
    assert r.exit_code == 0, r.output
    assert get_engine(str(out)).fitted_policies == ("full",)
    r = run("predict", "--gpu", "h200", "--seq", "4096", "--kv-ratio", "0.5", "--engine", str(out), "--json")
    assert r.exit_code == 0, r.output
    assert any("fitted on no keyformer rows (full only)" in n for n in json.loads(r.output)["notes"])
    both = tmp_path / "both.yaml"
    assert run("calibrate", write(tmp_path, df), "--out", str(both)).exit_code == 0
    assert get_engine(str(both)).fitted_policies == ("full", "keyformer")
    r = run("predict", "--gpu", "h200", "--seq", "4096", "--kv-ratio", "0.5", "--engine", str(both), "--json")
    assert not any("fitted on no" in n for n in json.loads(r.output)["notes"])


def test_several_measured_engines_need_a_choice(tmp_path):
    df = synthetic()
    df["engine"] = ["torch-graph", "torch-eager"] * (len(df) // 2)
    p = write(tmp_path, df)
    r = run("validate", p, "--engine", "ideal")
    assert r.exit_code == 2 and "choose one with --measured-engine" in r.output
    assert run("validate", p, "--engine", "ideal", "--measured-engine", "torch-graph").exit_code == 0


def test_shipped_default_engine_matches_committed_data():
    """The shipped engine predicts the committed H100 measurements it was fitted on (regression guard)."""
    df = measurements.load(["data/h100-sxm-plain/rows.csv"], "torch-graph", "decode")
    err = predict_frame(df, get_engine("default")) / df["step_ms"] - 1
    assert np.mean(np.abs(err)) < 0.05


def test_fused_scorer_cost_is_fitted_only_for_a_fused_decoder():
    """--fused-scorer: the scorer's arithmetic is fitted; its logit passes (the z round trip) and launches (none
    beyond the full cache's) are the kernel's, not fitted."""
    true = dataclasses.replace(TRUE, kernels_per_op={"keyformer": 0.0}, keyformer_logit_passes=2.0,
                               keyformer_flops_per_kv_byte=60.0)
    df = synthetic(true)
    plain = calibrate.fit(df, "plain")
    assert "keyformer_flops_per_kv_byte" not in plain.fitted and plain.engine.keyformer_flops_per_kv_byte == 0
    fused = calibrate.fit(df, "fused", fused_scorer=True)
    assert "keyformer_flops_per_kv_byte" in fused.fitted
    assert "keyformer_logit_passes" not in fused.fitted and "kernels_per_op.keyformer" not in fused.fitted
    assert fused.engine.keyformer_logit_passes == 2.0 and fused.engine.kernels_per_op["keyformer"] == 0.0
    assert fused.mape < plain.mape and fused.mape < 1.0
    # the fused fit carries to a GPU with more bandwidth and the same SMs, where the plain one cannot
    other = synthetic(true, gpu="h200")
    err = lambda e: np.mean(np.abs(predict_frame(other, e) / other["step_ms"] - 1))  # noqa: E731
    assert err(fused.engine) < 0.02 and err(fused.engine) < err(plain.engine)


def test_calibrate_cli_fused_scorer(tmp_path):
    p = tmp_path / "m.csv"
    synthetic(dataclasses.replace(TRUE, keyformer_flops_per_kv_byte=30.0)).to_csv(p, index=False)
    out = tmp_path / "e.yaml"
    r = CliRunner().invoke(cli, ["calibrate", str(p), "--out", str(out), "--fused-scorer"])
    assert r.exit_code == 0, r.output
    assert "keyformer_flops_per_kv_byte" in r.output and "--fused-scorer" in out.read_text()


def test_calibrate_warns_of_each_parameter_at_a_bound(tmp_path):
    """A parameter pinned on its bound is named on stderr (here the skinny-GEMM cap holds the weight bandwidth)."""
    p = write(tmp_path, synthetic(dataclasses.replace(TRUE, weight_bandwidth_fraction=0.95)))
    micro = tmp_path / "micro.csv"
    pd.DataFrame({"bench": ["skinny_gemm"], "gbps": [2680.0], "gpu": ["h100-sxm"]}).to_csv(micro, index=False)
    r = CliRunner().invoke(cli, ["calibrate", p, "--microbench", str(micro), "--out",
                                str(tmp_path / "e.yaml")])
    assert r.exit_code == 0, r.output
    assert "warning: weight_bandwidth_fraction ended at its upper bound 0.8 (microbenchmark cap)" in r.stderr
    r = run("calibrate", p, "--microbench", str(micro), "--out", str(tmp_path / "e.yaml"), "--json")
    assert json.loads(r.stdout)["at_bound"]["weight_bandwidth_fraction"].startswith("upper")


def test_snap_puts_values_near_a_bound_on_it():
    lo, hi = np.array([0.0, 1.0]), np.array([200.0, 2.0])
    assert calibrate._snap(np.array([1e-12, 1.5]), lo, hi).tolist() == [0.0, 1.5]
    assert calibrate._snap(np.array([100.0, 2.0 - 1e-9]), lo, hi).tolist() == [100.0, 2.0]


#: an eager framework: every kernel dispatched from Python (20 us each, 3 ms a step), a full cache appended by
#: copying that moves each attended KV byte three times, and evicting caches that write in place (1.5 times)
EAGER = dataclasses.replace(TRUE, host_us_per_kernel=20.0, host_step_us=3000.0, kv_traffic_factor=3.0,
                            evicting_kv_traffic_factor=1.5, grouped_kv_expansion=0.5)


def test_recovers_host_dispatch_and_kv_traffic():
    """--host-dispatch: the host's cost per kernel and per step, and the KV traffic per attended byte (told apart
    from a slow HBM by the attention microbenchmark's cap on kv_bandwidth_fraction)."""
    df = synthetic(EAGER, models=("llama-3-8b", "cerebras-gpt-1.3b"))
    f = calibrate.fit(df, "eager", host_dispatch=True, bounds={"kv_bandwidth_fraction": 0.7})
    assert f.mape < 0.5
    assert f.engine.host_us_per_kernel == pytest.approx(20.0, rel=0.05)
    assert f.engine.host_step_us == pytest.approx(3000.0, rel=0.05)
    assert f.engine.kv_traffic_factor == pytest.approx(3.0, rel=0.05)
    assert f.engine.evicting_kv_traffic_factor == pytest.approx(1.5, rel=0.05)
    # Llama-3-8B's 4 query heads per KV head read its cache 1 + 0.5 x 3 times; Cerebras-GPT's, once
    assert f.engine.grouped_kv_expansion == pytest.approx(0.5, rel=0.05)
    assert "host_us_per_kernel" not in calibrate.fit(df[df["batch"] > 1], "graph").fitted  # only when asked
    one_kind = calibrate.fit(df[df["model"] == "llama-3-8b"], "eager", host_dispatch=True,
                             bounds={"kv_bandwidth_fraction": 0.7})
    assert "grouped_kv_expansion" not in one_kind.fitted  # grouped heads alone cannot tell it from the KV traffic


def test_host_speed_scales_the_host_terms():
    """Rows from a host that launches kernels 1.5 times slower (host_launch_us, recorded per row) are fitted at
    the rows' median host, and each row, and a prediction for another host, at its own launch cost."""
    true = dataclasses.replace(EAGER, host_launch_us=6.0)
    df = synthetic(models=("llama-3-8b", "cerebras-gpt-1.3b"))
    df["host_launch_us"] = np.where(df["policy"] == "full", 6.0, 9.0)  # the keyformer rows on a slower host
    df["step_ms"] = predict_frame(df, true)
    f = calibrate.fit(df, "eager", host_dispatch=True, bounds={"kv_bandwidth_fraction": 0.7})
    assert f.engine.host_launch_us == 9.0 and f.fitted["host_launch_us"] == 9.0  # the median row's host
    assert f.mape < 0.5
    assert f.engine.host_us_per_kernel == pytest.approx(20.0 * 9.0 / 6.0, rel=0.05)
    # a host-bound step is proportional to the host's launch cost; a GPU-bound one does not move
    s = make_setup(gpu="h100", model="llama-3-8b", engine="ideal", policy="keyformer", kv_ratio=0.5)
    s = dataclasses.replace(s, engine=f.engine)
    at = lambda us, batch: float(step_time(dataclasses.replace(s, host_launch_us=us), batch, 1024).seconds)  # noqa: E731
    assert at(4.5, 1) == pytest.approx(at(9.0, 1) / 2, rel=1e-6)
    assert at(None, 1) == at(9.0, 1) == at(float("nan"), 1)  # unknown: the engine's own host
    assert at(4.5, 64) <= at(9.0, 64)
    plain = calibrate.fit(df.drop(columns="host_launch_us"), "eager", host_dispatch=True,
                          bounds={"kv_bandwidth_fraction": 0.7})
    assert plain.engine.host_launch_us is None and plain.mape > f.mape  # one host speed for both cannot fit
    assert calibrate.fit(df[df["batch"] > 1], "graph").engine.host_launch_us is None  # only with host terms


def test_host_launch_us_in_predict():
    r = CliRunner().invoke(cli, ["predict", "--gpu", "h200", "--model", "llama-3-8b", "--engine", "hf-eager",
                                 "--seq", "4096", "--kv-ratio", "0.5", "--json"])
    own = json.loads(r.output)
    ref = get_engine("hf-eager").host_launch_us
    assert own["host_launch_us"] == ref and any("--host-launch-us" in n for n in own["notes"])
    r = CliRunner().invoke(cli, ["predict", "--gpu", "h200", "--model", "llama-3-8b", "--engine", "hf-eager",
                                 "--seq", "4096", "--kv-ratio", "0.5", "--host-launch-us", str(ref * 2), "--json"])
    slow = json.loads(r.output)
    assert slow["host_launch_us"] == ref * 2 and slow["step_ms"] > own["step_ms"]
    bad = [(["--host-launch-us", v], f"{v} is out of range; allowed: 0 < US <= 1000") for v in ("0", "nan", "inf", "-1")]
    for args, why in bad + [(["--host-launch-us", "6", "--engine", "default"], "engine default has no host terms")]:
        r = CliRunner().invoke(cli, ["predict", "--gpu", "h200", "--seq", "1024", *args])
        assert r.exit_code == 2 and why in r.output and "Traceback" not in r.output


def test_kv_traffic_without_host_dispatch(tmp_path):
    """--kv-traffic: a graph-replayed stack that attends its cache three times over, grouped heads expanded half
    way (transformers' static cache under torch.compile), fitted as such with no host terms; without the flag
    the same rows can only be fitted as a slow HBM."""
    graphs = dataclasses.replace(TRUE, kv_traffic_factor=3.0, grouped_kv_expansion=0.5)
    df = synthetic(graphs, models=("llama-3-8b", "gpt-j-6b"))
    df = df[df["policy"] == "full"]
    f = calibrate.fit(df, "graphs", kv_traffic=True, bounds={"kv_bandwidth_fraction": 0.7})
    assert f.mape < 0.5
    assert f.engine.kv_traffic_factor == pytest.approx(3.0, rel=0.05)
    assert f.engine.grouped_kv_expansion == pytest.approx(0.5, rel=0.05)
    assert not {"host_us_per_kernel", "host_step_us", "evicting_kv_traffic_factor"} & set(f.fitted)
    slow = calibrate.fit(df, "graphs", bounds={"kv_bandwidth_fraction": 0.7})
    assert "kv_traffic_factor" not in slow.fitted and slow.mape > 5 * f.mape
    p, out = tmp_path / "m.csv", tmp_path / "e.yaml"
    df.to_csv(p, index=False)
    r = CliRunner().invoke(cli, ["calibrate", str(p), "--out", str(out), "--kv-traffic"])
    assert r.exit_code == 0, r.output
    assert "kv_traffic_factor" in r.output and "host_us_per_kernel" not in r.output
    assert "--kv-traffic" in out.read_text() and get_engine(str(out)).kv_traffic_factor > 2.0


def test_grouped_kv_expansion_reads_a_groups_cache_once_per_query_head():
    """Expansion 1 prices Llama-3-8B's full-cache attention (32 query heads on 8 KV heads) as 4 reads of its cache
    (as a KV traffic of 4 would), 0.5 as 2.5; a model without grouped heads (GPT-J-6B), or an evicting cache, is
    not changed."""
    from kfsim.inputs import make_setup
    from kfsim.predict import step_time

    for model, expansion, reads in (("llama-3-8b", 1.0, 4.0), ("llama-3-8b", 0.5, 2.5), ("gpt-j-6b", 1.0, 1.0)):
        s = make_setup(gpu="h200", model=model, engine="ideal")
        expanded, traffic = (dataclasses.replace(s, engine=dataclasses.replace(s.engine, **kw))
                             for kw in ({"grouped_kv_expansion": expansion}, {"kv_traffic_factor": reads}))
        att = [float(step_time(x, 16, 8192).per_op["attention"]) for x in (s, expanded, traffic)]
        assert att[1] == pytest.approx(att[2], rel=1e-9) and (att[1] > att[0]) == (reads > 1)
    # an evicting cache attends through its own path (measure.hf.KeyformerCache shares a KV head among its group)
    s = make_setup(gpu="h200", model="llama-3-8b", engine="ideal", policy="keyformer", kv_ratio=0.5)
    expanded = dataclasses.replace(s, engine=dataclasses.replace(s.engine, grouped_kv_expansion=1.0))
    assert float(step_time(expanded, 16, 8192).seconds) == float(step_time(s, 16, 8192).seconds)


def test_evicting_kv_traffic_defaults_to_the_full_caches():
    """An engine silent on evicting_kv_traffic_factor prices an evicting cache's KV as the full cache's; set, it
    changes the evicting caches' steps only."""
    from kfsim.inputs import make_setup
    from kfsim.policy import Policy
    from kfsim.predict import predict

    base = make_setup(gpu="h200", model="llama-3-8b", engine="ideal", policy="keyformer", kv_ratio=0.5)
    moved = dataclasses.replace(base.engine, kv_traffic_factor=3.0)
    step = lambda s, e: float(predict(dataclasses.replace(s, engine=e), 16, 8192)["step_ms"])  # noqa: E731
    full = dataclasses.replace(base, policy=Policy("full"))
    same = dataclasses.replace(moved, evicting_kv_traffic_factor=3.0)
    assert step(base, moved) == pytest.approx(step(base, same))
    less = dataclasses.replace(moved, evicting_kv_traffic_factor=1.0)
    assert step(base, less) < step(base, moved)
    assert step(full, less) == pytest.approx(step(full, moved))


def test_host_bound_steps_do_not_grow_with_the_cache_until_the_gpu_catches_up():
    from kfsim.inputs import make_setup
    from kfsim.predict import predict

    s = make_setup(gpu="h200", model="llama-3-8b", engine="ideal")
    eager = dataclasses.replace(s, engine=dataclasses.replace(s.engine, host_us_per_kernel=20.0, host_step_us=3000.0))
    small, large = (predict(eager, 1, c) for c in (1024, 2048))
    assert float(small["step_ms"]) == float(large["step_ms"]) and str(small["bound"]) == "host"
    big = predict(eager, 64, 16384)
    assert str(big["bound"]) != "host" and float(big["host_wait_ms"]) == 0.0
    assert float(big["step_ms"]) == pytest.approx(float(predict(s, 64, 16384)["step_ms"]))


def test_an_eager_prefill_takes_the_longer_of_its_host_dispatch_and_its_gpu_work():
    """One forward dispatches the same operations for a prompt of 128 tokens as for one decode token, so a short
    prompt costs what a host-bound decode step costs; a long one is the GPU's work, as without a host."""
    from kfsim.predict import prefill_time

    s = make_setup(gpu="h200", model="llama-3-8b", engine="ideal")
    counted = {"llama-3-8b": {"family": "llama", "layer": 40.0, "step": 12.0}}  # operations a forward dispatches
    eager = dataclasses.replace(s, engine=dataclasses.replace(s.engine, host_us_per_kernel=20.0, host_step_us=3000.0,
                                                              host_ops=counted))
    short = prefill_time(eager, 1, 128)
    host_s = (12 + 32 * 40) * 20e-6 + 3e-3
    assert float(short.host_s) > 0 and float(short.seconds) == pytest.approx(host_s)
    assert float(step_time(eager, 1, 1024).seconds) == pytest.approx(host_s)
    assert float(prefill_time(eager, 1, 16384).seconds) == pytest.approx(float(prefill_time(s, 1, 16384).seconds))
    assert float(prefill_time(s, 1, 128).seconds) < float(short.seconds) / 5


def _profile_of(engine, points, attention_scale=1.0):
    """A profile (kfsim measure --profile) whose groups are `engine`'s own times at `points` (batch, context)."""
    from kfsim.breakdown import GROUPS, predicted_groups
    from kfsim.inputs import make_setup
    from kfsim.predict import step_time

    s = dataclasses.replace(make_setup(gpu="h100-sxm", model="gpt-j-6b"), engine=engine)
    rows = []
    for b, c in points:
        t = step_time(s, b, c)
        groups = predicted_groups(t)
        for g in GROUPS:
            rows.append({"gpu": "h100-sxm", "model": "gpt-j-6b", "phase": "decode", "engine": "torch-eager",
                         "batch": b, "context": c, "kv_ratio": 1.0, "policy": "full", "group": g,
                         "ms": float(groups[g]) * (attention_scale if g == "attention" else 1.0),
                         "profiled_step_ms": float(t.seconds) * 1e3, "steps": 5, "source": "cuda kernels"})
    return pd.DataFrame(rows)


def _weights_and_overheads_confounded():
    """Full-cache steps of one model: the weights' time and the fixed costs are both constant in batch and
    context, so the steps alone cannot say how much of the constant part is weight streaming."""
    rows = [dict(gpu="h100-sxm", model="gpt-j-6b", batch=b, context=c, kv_ratio=1.0, policy="full", phase="decode")
            for b in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64) for c in (2048, 8192)]
    df = pd.DataFrame(rows)
    df["step_ms"] = predict_frame(df, TRUE)
    return df


def test_a_profile_pins_the_groups_that_the_steps_leave_free():
    """With the kernel time of each operation group, the weights' bandwidth is found (steps alone leave it traded
    against the fixed costs), and each group comes out as the true engine has it."""
    from kfsim.breakdown import predicted_groups
    from kfsim.inputs import make_setup
    from kfsim.predict import step_time

    prof = _profile_of(TRUE, [(1, 2048), (16, 8192)])
    f = calibrate.fit(_weights_and_overheads_confounded(), "grouped", profile=prof)
    assert f.profiled == 2 * 5 and f.mape < 0.5  # projections, attention, ffn, positional, lm_head at two points
    assert f.engine.weight_bandwidth_fraction == pytest.approx(0.8, rel=0.02)
    for b, c in [(4, 4096), (64, 2048)]:
        want = predicted_groups(step_time(dataclasses.replace(make_setup(gpu="h100-sxm", model="gpt-j-6b"), engine=TRUE), b, c))
        got = predicted_groups(step_time(dataclasses.replace(make_setup(gpu="h100-sxm", model="gpt-j-6b"), engine=f.engine), b, c))
        for g in ("projections", "attention", "ffn"):
            assert float(got[g]) == pytest.approx(float(want[g]), rel=0.02), (b, c, g)


def test_a_slower_profiled_group_moves_the_fit_toward_it():
    """A profile whose attention kernels take 1.3x the true engine's pulls the fitted attention time up, weighed
    against the 24 steps that disagree with it (one profiled point among them moves it a few percent)."""
    from kfsim.breakdown import predicted_groups
    from kfsim.inputs import make_setup
    from kfsim.predict import step_time

    rows = _weights_and_overheads_confounded()
    plain = calibrate.fit(rows, "plain")
    pulled = calibrate.fit(rows, "pulled", profile=_profile_of(TRUE, [(16, 8192)], attention_scale=1.3))
    attention = lambda e: float(predicted_groups(step_time(  # noqa: E731
        dataclasses.replace(make_setup(gpu="h100-sxm", model="gpt-j-6b"), engine=e), 16, 8192))["attention"])
    assert 1.02 * attention(plain.engine) < attention(pulled.engine) < 1.3 * attention(plain.engine)


def test_calibrate_cli_with_a_profile(tmp_path):
    rows, prof = write(tmp_path, _weights_and_overheads_confounded()), tmp_path / "p.csv"
    _profile_of(TRUE, [(1, 2048), (16, 8192)]).to_csv(prof, index=False)
    r = run("calibrate", rows, "--profile", prof, "--out", tmp_path / "e.yaml", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["profiled_group_times"] == 10
    assert f"--profile {prof}" in (tmp_path / "e.yaml").read_text()
    r = run("calibrate", rows, "--profile", tmp_path / "none.csv", "--out", tmp_path / "f.yaml")
    assert r.exit_code != 0 and "no such file" in r.output and "Traceback" not in r.output
    _profile_of(TRUE, [(1, 2048)]).assign(gpu="h300").to_csv(prof, index=False)
    r = run("calibrate", rows, "--profile", prof, "--out", tmp_path / "f.yaml")
    assert r.exit_code != 0 and f"{prof}: unknown gpu 'h300'" in r.output and not (tmp_path / "f.yaml").exists()


def test_an_engine_silent_on_rotary_prices_it_as_elementwise_kernels():
    """Engines written before rotary embeddings were a kind of their own predict what they did: their rotary
    kernels count as elementwise ones (matrix-vector batches too)."""
    from kfsim.engine import Engine

    old = Engine(name="old", kernels_per_op={"elementwise": 3.0}, matvec_max_batch=1.0,
                 matvec_kernels_per_op={"elementwise": 0.5})
    assert old.kernels("positional") == 3.0 and old.matvec_kernels("positional") == 0.5
    own = dataclasses.replace(old, kernels_per_op={**old.kernels_per_op, "positional": 7.0})
    assert own.kernels("positional") == 7.0 and own.matvec_kernels("positional") == 7.0


def test_a_profile_with_rotary_time_fits_its_kernels():
    """The rotary embedding's kernels (2 ops a layer) and the layer's fixed cost scale alike with the layers, so
    steps cannot tell them apart; the profiled positional group can, and its kernel count is recovered."""
    true = dataclasses.replace(TRUE, kernels_per_op={**TRUE.kernels_per_op, "positional": 8.0})
    rows = _weights_and_overheads_confounded()
    rows["step_ms"] = predict_frame(rows, true)
    assert "kernels_per_op.positional" not in calibrate.fit(rows, "steps").fitted
    f = calibrate.fit(rows, "grouped", profile=_profile_of(true, [(1, 2048), (16, 8192)]))
    assert f.engine.kernels("positional") == pytest.approx(8.0, rel=0.05)
    assert f.engine.layer_overhead_us == pytest.approx(40.0, rel=0.1)


#: operations transformers 5.17 dispatches per decode step (measure.host_ops on a CPU): per layer, outside the
#: layers, and more per layer with a Keyformer cache
HOST_OPS = {"llama-3-8b": {"family": "llama", "layer": 40.0, "step": 22.0, "scorer_layer": 33.0},
            "gpt-j-6b": {"family": "gptj", "layer": 52.0, "step": 15.0, "scorer_layer": 25.0},
            "mpt-7b": {"family": "mpt", "layer": 22.0, "step": 21.0, "scorer_layer": 31.0}}


def test_host_cost_per_counted_operation_predicts_a_model_never_timed():
    """--host-ops: a host spending 12 us on each operation it dispatches, fitted on two models, predicts a third
    whose layers dispatch half as many (LayerNorm and no rotary) from its count alone; kfsim's own kernel count,
    alike for the three, cannot."""
    true = dataclasses.replace(EAGER, host_ops=HOST_OPS, host_us_per_kernel=12.0, host_step_us=500.0)
    df = synthetic(true, models=tuple(HOST_OPS))
    df = df[df["phase"] == "decode"]
    seen = df["model"] != "mpt-7b"
    caps = {"kv_bandwidth_fraction": 0.7}
    counted = calibrate.fit(df[seen], "eager", start=dataclasses.replace(IDEAL, host_ops=HOST_OPS),
                            host_dispatch=True, bounds=caps)
    assert counted.engine.host_us_per_kernel == pytest.approx(12.0, rel=0.05)
    unseen = df[~seen]
    err = np.abs(predict_frame(unseen, counted.engine) / unseen["step_ms"] - 1)
    # within 0.5 % but at batch 1 x 1k (6 %), where the GPU's work, not all of whose terms host-bound rows
    # identify, comes near the host's
    assert np.median(err) < 0.005 and err.max() < 0.08
    blind = calibrate.fit(df[seen], "eager", host_dispatch=True, bounds=caps)
    assert np.abs(predict_frame(unseen, blind.engine) / unseen["step_ms"] - 1).max() > 0.2


def test_dispatched_ops_follow_the_model_then_its_family():
    from kfsim.workload import get_workload

    e = dataclasses.replace(IDEAL, host_ops=HOST_OPS)
    assert e.dispatched_ops(get_workload("llama-3-8b"), scored=False) == 22 + 32 * 40
    assert e.dispatched_ops(get_workload("gpt-j-6b"), scored=True) == 15 + 28 * (52 + 25)
    assert e.dispatched_ops(get_workload("llama-2-13b"), scored=False) == 22 + 40 * 40  # Llama's count, its layers
    assert e.dispatched_ops(get_workload("cerebras-gpt-6.7b"), scored=False) is None  # not counted: kernels
    from kfsim.inputs import make_setup
    from kfsim.predict import predict

    s = make_setup(gpu="h100", model="llama-3-8b", engine="ideal", policy="keyformer", kv_ratio=0.5)
    eager = dataclasses.replace(s, engine=dataclasses.replace(e, host_us_per_kernel=12.0))
    out = predict(eager, 1, 4096)
    assert float(out["host_ops"]) == 22 + 32 * (40 + 33) and float(out["full_host_ops"]) == 22 + 32 * 40
    assert float(predict(s, 1, 4096)["host_ops"]) == 0  # no host term: nothing dispatched is priced
    for bad in ({"layer": 3.0}, {"layer": float("nan"), "step": 1.0}, {"layer": 1e300, "step": 1.0}):
        with pytest.raises(KfsimError, match="host_ops of x must give layer and step"):
            dataclasses.replace(IDEAL, host_ops={"x": bad})


def test_host_ops_table_and_cli(tmp_path):
    table = tmp_path / "ops.csv"
    pd.DataFrame([dict(model="llama-3-8b", family="llama", policy="full", ops_per_layer=40, ops_per_step=22),
                  dict(model="llama-3-8b", family="llama", policy="keyformer", ops_per_layer=73, ops_per_step=22)]
                 ).to_csv(table, index=False)
    assert calibrate.read_host_ops(table) == {"llama-3-8b": {"family": "llama", "layer": 40.0, "step": 22.0,
                                                             "scorer_layer": 33.0}}
    # a table that counts every dispatched op (views included) is read by those counts
    every = tmp_path / "every.csv"
    pd.read_csv(table).assign(dispatched_per_layer=[54, 96], dispatched_per_step=[29, 29]).to_csv(every, index=False)
    assert calibrate.read_host_ops(every) == {"llama-3-8b": {"family": "llama", "layer": 54.0, "step": 29.0,
                                                             "scorer_layer": 42.0}}
    rows = tmp_path / "rows.csv"
    true = dataclasses.replace(EAGER, host_ops=HOST_OPS, host_us_per_kernel=12.0, host_step_us=500.0)
    synthetic(true, models=("llama-3-8b", "gpt-j-6b")).to_csv(rows, index=False)
    out = tmp_path / "e.yaml"
    r = CliRunner().invoke(cli, ["calibrate", str(rows), "--out", str(out), "--host-ops", str(table)])
    assert r.exit_code != 0 and "needs --host-dispatch" in r.output
    r = CliRunner().invoke(cli, ["calibrate", str(rows), "--out", str(out), "--host-ops", str(table),
                                 "--host-dispatch"])
    assert r.exit_code == 0, r.output
    assert get_engine(str(out)).host_ops == calibrate.read_host_ops(table)  # the counts travel with the engine
    (tmp_path / "bad.csv").write_text("model,policy\nllama-3-8b,full\n")
    r = CliRunner().invoke(cli, ["calibrate", str(rows), "--out", str(out), "--host-dispatch", "--host-ops",
                                 str(tmp_path / "bad.csv")])
    assert r.exit_code != 0 and "no column ops_per_layer" in r.output and "Traceback" not in r.output
    (tmp_path / "text.csv").write_text("model,policy,ops_per_layer,ops_per_step\nllama-3-8b,full,forty,22\n")
    r = CliRunner().invoke(cli, ["calibrate", str(rows), "--out", str(out), "--host-dispatch", "--host-ops",
                                 str(tmp_path / "text.csv")])
    assert r.exit_code != 0 and "counts must be numbers >= 0" in r.output and "Traceback" not in r.output
    (tmp_path / "huge.csv").write_text("model,policy,ops_per_layer,ops_per_step\nllama-3-8b,full,1e300,22\n")
    r = CliRunner().invoke(cli, ["calibrate", str(rows), "--out", str(out), "--host-dispatch", "--host-ops",
                                 str(tmp_path / "huge.csv")])
    assert r.exit_code == 2 and f"{tmp_path / 'huge.csv'}: engine ideal: host_ops of llama-3-8b" in r.output


#: bytes moved per attended KV byte, counted per model (measure.kv_passes; transformers 5.17 eager)
KV_PASSES = {"llama-3-8b": {"family": "llama", "full": {"streamed": 3.0, "strided": 0.0}},
             "gpt-j-6b": {"family": "gptj", "full": {"streamed": 5.0, "strided": 0.0}},
             "mpt-7b": {"family": "mpt", "full": {"streamed": 1.1, "strided": 2.0},
                        "full_batch1": {"streamed": 3.1, "strided": 0.0}},
             "mistral-7b": {"family": "llama", "full": {"streamed": 3.0, "strided": 0.0},
                            "window": {"streamed": 12.0, "strided": 2.0}}}


def test_counted_kv_passes_pick_the_path_of_each_point():
    from kfsim.workload import get_workload

    e = dataclasses.replace(IDEAL, kv_passes=KV_PASSES)
    mpt, mistral = get_workload("mpt-7b"), get_workload("mistral-7b")
    streamed, strided = e.counted_kv_passes(mpt, np.array([1, 16]), np.array([4096, 4096]))
    assert streamed.tolist() == [3.1, 1.1] and strided.tolist() == [0.0, 2.0]
    window = mistral.sliding_window
    streamed, strided = e.counted_kv_passes(mistral, 16, np.array([window - 1, window]))
    assert streamed.tolist() == [3.0, 12.0] and strided.tolist() == [0.0, 2.0]
    assert e.counted_kv_passes(get_workload("llama-2-13b"), 1, 1024)[0] == 3.0  # its family's count
    assert e.counted_kv_passes(get_workload("cerebras-gpt-6.7b"), 1, 1024) is None
    # a windowed model of a family counted without a window path is not priced by the family's full path
    only_full = dataclasses.replace(IDEAL, kv_passes={"llama-3-8b": KV_PASSES["llama-3-8b"]})
    assert only_full.counted_kv_passes(mistral, 1, 1024) is None
    numbers = "kv_passes of x must give each path as streamed and strided numbers"
    for bad, why in (({"window": {"streamed": 1.0, "strided": 0.0}}, "kv_passes of x has no path full"),
                     ({"full": {"streamed": -1.0, "strided": 0}}, numbers),
                     ({"full": {"streamed": float("nan"), "strided": 0}}, numbers),
                     ({"full": {"streamed": 2.8e297, "strided": 0}}, numbers),  # overflowed a step (fuzzed)
                     ({"full": {"streamed": 1.0}}, numbers),
                     ({"full": {"streamed": 1.0, "strided": 0.0}, "half": {}}, "kv_passes of x has path 'half'; allowed"),
                     ({"full": {"streamed": 1.0, "strided": 0.0, "scorer": 1.0}}, "scorer passes on a path that "
                      "does not score; only keyformer, h2o"),
                     ({"full": {"streamed": 1.0, "strided": 0.0},
                       "keyformer": {"streamed": 1.0, "strided": 0.0, "scorer": -1.0}}, numbers)):
        with pytest.raises(KfsimError, match=why):
            dataclasses.replace(IDEAL, kv_passes={"x": bad})


#: the same with each model's Keyformer cache counted: its attention's passes over the kept tokens, and its scorer's
#: passes per kept KV byte (measure.kv_passes on transformers 5.17: grouped heads' logits weigh more per KV byte)
SCORED_PASSES = {m: {**paths, "keyformer": {"streamed": s, "strided": 0.0, "scorer": c}}
                 for (m, paths), (s, c) in zip(KV_PASSES.items(), ((1.33, 0.76), (1.07, 0.15), (1.23, 0.29),
                                                                    (1.33, 0.76)))}


def test_a_counted_keyformer_cache_replaces_the_fitted_scorer_passes():
    """Engine.counted_scored_passes prices a counted Keyformer cache: its attention's passes replace the evicting
    traffic factor (and grouped heads' expansion), its scorer's passes the engine's logit passes; a model or policy
    not counted keeps the engine's."""
    from kfsim.inputs import make_setup
    from kfsim.predict import logit_passes_of
    from kfsim.workload import get_workload

    e = dataclasses.replace(TRUE, kv_passes=SCORED_PASSES, grouped_kv_expansion=1.0, evicting_kv_traffic_factor=5.0)
    assert e.counted_scored_passes(get_workload("llama-3-8b"), "keyformer") == (1.33, 0.76)
    assert e.counted_scored_passes(get_workload("llama-2-13b"), "keyformer") == (1.33, 0.76)  # its family's
    assert e.counted_scored_passes(get_workload("llama-3-8b"), "h2o") is None
    assert e.counted_scored_passes(get_workload("cerebras-gpt-6.7b"), "keyformer") is None

    def setup(model, engine):
        return dataclasses.replace(make_setup(gpu="h100-sxm", model=model, policy="keyformer", kv_ratio=0.5),
                                   engine=engine)

    # Llama-3-8B: a token's K and V are 2 x 8 heads x 128 x 2 bytes = 4,096 per layer; 0.76 of that, less the
    # score buffer's 8 bytes per KV head (64), over 32 query heads' fp32 logits (128 bytes): 23.8 passes
    assert logit_passes_of(setup("llama-3-8b", e)) == pytest.approx((0.76 * 4096 - 64) / 128)
    assert logit_passes_of(setup("cerebras-gpt-6.7b", e)) == TRUE.keyformer_logit_passes
    # a counted scorer's passes stream like the stack's other counted passes (at kv_bandwidth_fraction: the profiled
    # scorer of Llama-3-8B at batch 64 x 16,384 on the H200 took 16.1 ms, its bytes at HBM speed 10.4); an
    # uncounted scorer's logit passes stay at other_bandwidth_fraction
    def scorer_ms(model, kv_fraction):
        x = dataclasses.replace(e, kv_bandwidth_fraction=kv_fraction, kernel_overhead_us=0.0)
        return float(step_time(setup(model, x), 64, 8192).per_op["keyformer_score"])
    # (the score buffer's own 8 bytes per KV head and token, 2 % of the scorer's, stay at other_bandwidth_fraction)
    assert scorer_ms("llama-3-8b", 0.5) == pytest.approx(2 * scorer_ms("llama-3-8b", 1.0), rel=0.02)
    assert scorer_ms("llama-3-8b", 0.5) < 1.98 * scorer_ms("llama-3-8b", 1.0)
    assert scorer_ms("cerebras-gpt-6.7b", 0.5) == pytest.approx(scorer_ms("cerebras-gpt-6.7b", 1.0), rel=1e-9)
    # the counted cache is not the evicting traffic factor's: changing that factor moves only uncounted models
    more = dataclasses.replace(e, evicting_kv_traffic_factor=10.0)
    for model, moves in (("llama-3-8b", False), ("cerebras-gpt-6.7b", True)):
        a, b = (float(predict(setup(model, x), 64, 16384)["step_ms"]) for x in (e, more))
        assert (b > a * 1.01) == moves, model


def test_counted_keyformer_caches_fitted_on_two_models_predict_two_never_timed():
    """--kv-passes with scored paths: Keyformer rows of a stack whose cache and scorer are counted fit no logit
    passes or evicting traffic of their own, and predict the Keyformer steps of models never timed."""
    true = dataclasses.replace(TRUE, kv_passes=SCORED_PASSES, strided_copy_gbps_per_sm=STRIDED_PER_SM)
    df = synthetic(true, models=tuple(SCORED_PASSES))
    df = df[df["phase"] == "decode"]
    seen = df["model"].isin(["gpt-j-6b", "llama-3-8b"])
    fit = calibrate.fit(df[seen], "eager", start=dataclasses.replace(IDEAL, kv_passes=SCORED_PASSES),
                        kv_traffic=True, bounds={"kv_bandwidth_fraction": 0.7})
    assert not {"keyformer_logit_passes", "evicting_kv_traffic_factor", "grouped_kv_expansion"} & set(fit.fitted)
    unseen = df[~seen & (df["policy"] == "keyformer")]
    assert np.abs(predict_frame(unseen, fit.engine) / unseen["step_ms"] - 1).max() < 0.05


#: GB/s per SM of PyTorch's per-element copy: 670 GB/s over the H100 SXM's 132 SMs, a fifth of its HBM bandwidth
#: (kfsim microbench cat_strided ran at 686-708 GB/s there, 661-667 on the H200)
STRIDED_PER_SM = 670.0 / 132


def test_strided_copies_fitted_on_two_models_predict_two_never_timed():
    """--kv-passes: a stack whose concatenations with a strided input run at a fifth of HBM bandwidth; fitted on
    MPT-7B's rows (whose appends are strided at batch > 1) and Llama-3-8B's, the counted passes predict Mistral-7B
    past its window and GPT-J-6B; a single fitted KV traffic factor cannot."""
    true = dataclasses.replace(TRUE, kv_passes=KV_PASSES, strided_copy_gbps_per_sm=STRIDED_PER_SM)
    df = synthetic(true, models=tuple(KV_PASSES))
    df = df[(df["phase"] == "decode") & (df["policy"] == "full")]
    seen = df["model"].isin(["mpt-7b", "llama-3-8b"])
    caps = {"kv_bandwidth_fraction": 0.7}
    counted = calibrate.fit(df[seen], "eager", start=dataclasses.replace(IDEAL, kv_passes=KV_PASSES),
                            kv_traffic=True, bounds=caps)
    assert counted.engine.strided_copy_gbps_per_sm == pytest.approx(STRIDED_PER_SM, rel=0.05)
    assert "kv_traffic_factor" not in counted.fitted  # every full cache fitted is counted
    unseen = df[~seen]
    assert np.abs(predict_frame(unseen, counted.engine) / unseen["step_ms"] - 1).max() < 0.05
    blind = calibrate.fit(df[seen], "eager", kv_traffic=True, bounds=caps)
    assert np.abs(predict_frame(unseen, blind.engine) / unseen["step_ms"] - 1).max() > 0.2
    # rows without a strided copy cannot inform its bandwidth: it is not fitted (a microbenchmark gives it)
    plain = calibrate.fit(df[df["model"].isin(["llama-3-8b", "gpt-j-6b"])], "eager",
                          start=dataclasses.replace(IDEAL, kv_passes=KV_PASSES), kv_traffic=True, bounds=caps)
    assert "strided_copy_gbps_per_sm" not in plain.fitted


def test_strided_copies_run_at_the_sms_pace_on_another_gpu():
    """An engine fitted on the H100's rows prices the H200's strided copies at the same rate per SM (both have 132
    SMs), not at the H100's fraction of the H200's faster HBM: MPT-7B's full cache at batch > 1 is recovered."""
    true = dataclasses.replace(TRUE, kv_passes=KV_PASSES, strided_copy_gbps_per_sm=STRIDED_PER_SM)
    rows = lambda gpu: synthetic(true, gpu=gpu, models=("mpt-7b", "llama-3-8b")).query(  # noqa: E731
        "phase == 'decode' and policy == 'full'")
    fit = calibrate.fit(rows("h100-sxm"), "eager", start=dataclasses.replace(IDEAL, kv_passes=KV_PASSES),
                        kv_traffic=True, bounds={"kv_bandwidth_fraction": 0.7})
    h200 = rows("h200")
    assert np.abs(predict_frame(h200, fit.engine) / h200["step_ms"] - 1).max() < 0.05
    # the copy's share of MPT-7B's step at batch 64 x 16,384 on the H200 is large enough to tell the two apart:
    # priced as a fifth of the H200's 4,800 GB/s it would run 1.43 times too fast
    mpt = h200.query("model == 'mpt-7b' and batch == 64 and context == 16384")
    as_fraction = dataclasses.replace(fit.engine, strided_copy_gbps_per_sm=0.2 * 4800 / 132)
    assert float(predict_frame(mpt, as_fraction)[0]) < 0.9 * float(mpt["step_ms"].iloc[0])


def test_kv_passes_table_and_microbenchmark_in_the_cli(tmp_path):
    table = tmp_path / "passes.csv"
    pd.DataFrame([dict(model=m, path=p, **v)
                  for m, paths in SCORED_PASSES.items() for p, v in paths.items() if p != "family"]).to_csv(table,
                                                                                                          index=False)
    assert calibrate.read_kv_passes(table) == SCORED_PASSES  # scorer only on the scored paths (empty elsewhere)
    table = tmp_path / "full-only.csv"
    pd.DataFrame([dict(model=m, path=p, streamed=v["streamed"], strided=v["strided"])
                  for m, paths in KV_PASSES.items() for p, v in paths.items() if p != "family"]).to_csv(table,
                                                                                                       index=False)
    assert calibrate.read_kv_passes(table) == KV_PASSES
    true = dataclasses.replace(TRUE, kv_passes=KV_PASSES, strided_copy_gbps_per_sm=STRIDED_PER_SM)
    rows, micro, out = tmp_path / "rows.csv", tmp_path / "micro.csv", tmp_path / "e.yaml"
    synthetic(true, models=("llama-3-8b", "gpt-j-6b")).to_csv(rows, index=False)
    # H100 SXM: 3,350 GB/s by its datasheet (hw_profiles/h100-sxm.yaml); 670 GB/s is a fifth of it
    pd.DataFrame([dict(bench="cat_strided", gbps=660.0, gpu="h100-sxm"),
                  dict(bench="cat_strided_token", gbps=680.0, gpu="h100-sxm"),
                  dict(bench="cat_contiguous", gbps=2900.0, gpu="h100-sxm")]).to_csv(micro, index=False)
    r = CliRunner().invoke(cli, ["calibrate", str(rows), "--out", str(out), "--kv-passes", str(table),
                                 "--microbench", str(micro)])
    assert r.exit_code == 0, r.output
    e = get_engine(str(out))
    assert e.kv_passes == KV_PASSES and e.strided_copy_gbps_per_sm == pytest.approx(670 / 132, rel=1e-3)
    assert "--kv-passes" in e.source["fit"] and "cat_strided" in e.source["strided_copy_gbps_per_sm"]
    (tmp_path / "bad.csv").write_text("model,path,streamed,strided\nllama-3-8b,half,1,0\n")
    r = CliRunner().invoke(cli, ["calibrate", str(rows), "--out", str(out), "--kv-passes", str(tmp_path / "bad.csv")])
    assert r.exit_code != 0 and "has path 'half'; allowed: full, full_batch1" in r.output
    assert "Traceback" not in r.output
    (tmp_path / "word.csv").write_text("model,path,streamed,strided,scorer\nllama-3-8b,full,3,0,\n"
                                       "llama-3-8b,keyformer,1.3,0,lots\n")
    r = CliRunner().invoke(cli, ["calibrate", str(rows), "--out", str(out), "--kv-passes", str(tmp_path / "word.csv")])
    assert r.exit_code != 0 and "scorer 'lots' is not a number" in r.output and "Traceback" not in r.output


#: prefill's attention per score (measure.prefill_counts on transformers 5.17): SDPA's causal half without a score
#: written (Llama-3-8B), SDPA over the whole square with a mask (Mistral-7B), fp32 query-key products and scores
#: materialised (GPT-J-6B), 16-bit scores materialised with an ALiBi bias (MPT-7B)
PREFILL_COUNTS = {
    "llama-3-8b": {"family": "llama", "full": {"tensor_flops": 256.0, "fp32_flops": 0.0, "score_bytes": 0.0}},
    "gpt-j-6b": {"family": "gptj", "full": {"tensor_flops": 512.0, "fp32_flops": 512.0, "score_bytes": 40.38}},
    "mistral-7b": {"family": "llama", "full": {"tensor_flops": 512.0, "fp32_flops": 0.0, "score_bytes": 0.38}},
    "mpt-7b": {"family": "mpt", "full": {"tensor_flops": 512.0, "fp32_flops": 0.0, "score_bytes": 48.25}},
}


def _prefill_setup(model, engine, policy="full", kv_ratio=1.0):
    return dataclasses.replace(make_setup(gpu="h100-sxm", model=model, policy=policy, kv_ratio=kv_ratio),
                               engine=engine)


def test_counted_prefill_attention_matches_a_hand_count():
    """GPT-J-6B's eager prefill of 8,192 tokens on the H100: 28 layers x 16 heads x 8,192^2 scores, each 512 fp32
    FLOPs at the 67 TFLOP/s vector peak and 40.38 bytes at 3,350 GB/s, each its own kernels; the 16-bit products
    at the tensor peak (989 TFLOP/s) in place of the roofline's causal half."""
    from kfsim.predict import prefill_time
    from kfsim.workload import get_workload

    e = dataclasses.replace(IDEAL, prefill_attention=PREFILL_COUNTS)
    scores = 28 * 16 * 8192.0 ** 2
    per_op = prefill_time(_prefill_setup("gpt-j-6b", e), 1, 8192).per_op
    assert float(per_op["attention_fp32"]) == pytest.approx(scores * 512 / 67e12)
    assert float(per_op["attention_scores"]) == pytest.approx(scores * 40.38 / 3350e9)
    assert float(per_op["attention"]) == pytest.approx(scores * 512 / 989e12, rel=0.01)  # + the Q, K, V bytes
    slower = dataclasses.replace(e, score_bandwidth_fraction=0.5)
    assert float(prefill_time(_prefill_setup("gpt-j-6b", slower), 1, 8192).per_op["attention_scores"]) == \
        pytest.approx(2 * float(per_op["attention_scores"]))
    # a model of a counted family takes its family's count; another policy, or a model of no counted family, the
    # roofline's causal half
    assert e.counted_prefill(get_workload("llama-2-13b"), "full") == PREFILL_COUNTS["llama-3-8b"]["full"]
    assert e.counted_prefill(get_workload("llama-3-8b"), "keyformer") is None
    assert e.counted_prefill(get_workload("llama-3-8b"), "window") is None
    assert e.counted_prefill(get_workload("cerebras-gpt-6.7b"), "full") is None
    roofline = prefill_time(_prefill_setup("cerebras-gpt-6.7b", e), 1, 8192)
    assert "attention_fp32" not in roofline.per_op
    # where counted, prefill grows as the square of the prompt once attention dominates
    t = [float(prefill_time(_prefill_setup("gpt-j-6b", e), 1, p).seconds) for p in (16384, 32768)]
    assert t[1] / t[0] > 3.5


def test_counted_prefill_fitted_on_two_models_predicts_two_never_timed():
    """--prefill-counts: a stack that materialises some models' scores (at 0.6 of HBM bandwidth) and runs flash
    attention for others; fitted on GPT-J-6B's and Llama-3-8B's prefill, the counts predict Mistral-7B's and
    MPT-7B's, where one attention efficiency for every model cannot."""
    true = dataclasses.replace(TRUE, prefill_attention=PREFILL_COUNTS, score_bandwidth_fraction=0.6)
    df = synthetic(true, models=tuple(PREFILL_COUNTS), prefill_batches=(1, 4))
    df = df[df["policy"] == "full"]
    seen = df["model"].isin(["gpt-j-6b", "llama-3-8b"])
    counted = calibrate.fit(df[seen], "eager", start=dataclasses.replace(IDEAL, prefill_attention=PREFILL_COUNTS))
    assert counted.engine.score_bandwidth_fraction == pytest.approx(0.6, rel=0.05)
    assert "keyformer_prefill_logit_passes" not in counted.fitted
    unseen = df[~seen & (df["phase"] == "prefill")]
    assert np.abs(predict_frame(unseen, counted.engine) / unseen["step_ms"] - 1).max() < 0.05
    blind = calibrate.fit(df[seen], "eager")
    assert "score_bandwidth_fraction" not in blind.fitted
    assert np.abs(predict_frame(unseen, blind.engine) / unseen["step_ms"] - 1).max() > 0.2


def test_prefill_counts_table_in_the_cli(tmp_path):
    table = tmp_path / "counts.csv"
    pd.DataFrame([dict(model=m, path=p, **v) for m, paths in PREFILL_COUNTS.items() for p, v in paths.items()
                  if p != "family"]).to_csv(table, index=False)
    assert calibrate.read_prefill_counts(table) == PREFILL_COUNTS
    rows, out = tmp_path / "rows.csv", tmp_path / "e.yaml"
    synthetic(dataclasses.replace(TRUE, prefill_attention=PREFILL_COUNTS), models=("llama-3-8b", "gpt-j-6b"),
              prefill_batches=(1, 4)).query("policy == 'full'").to_csv(rows, index=False)
    r = CliRunner().invoke(cli, ["calibrate", str(rows), "--out", str(out), "--prefill-counts", str(table)])
    assert r.exit_code == 0, r.output
    e = get_engine(str(out))
    assert e.prefill_attention == PREFILL_COUNTS and "--prefill-counts" in e.source["fit"]
    for text, why in (("model,path,tensor_flops,fp32_flops,score_bytes\nllama-3-8b,half,1,0,0\n",
                       "prefill_attention of llama-3-8b has path 'half'; allowed: full, keyformer, h2o"),
                      ("model,path,tensor_flops,fp32_flops,score_bytes\nllama-3-8b,full,1,0,1e9\n",
                       "must give each path as tensor_flops, fp32_flops, score_bytes, numbers from 0 to 10000"),
                      ("model,path,tensor_flops,fp32_flops\nllama-3-8b,full,1,0\n", "(no column score_bytes)")):
        (tmp_path / "bad.csv").write_text(text)
        r = CliRunner().invoke(cli, ["calibrate", str(rows), "--out", str(out), "--prefill-counts",
                                     str(tmp_path / "bad.csv")])
        assert r.exit_code != 0 and why in r.output and "Traceback" not in r.output, r.output
