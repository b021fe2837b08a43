"""The model's answers on cases whose result follows from first principles."""
import numpy as np
import pytest

from kfsim import predict as predict_module
from kfsim.errors import KfsimError
from kfsim.inputs import make_setup
from kfsim.predict import predict, request_cached
from kfsim.workload import get_workload


def test_ideal_batch1_is_weights_over_bandwidth(setup_of):
    s = setup_of(gpu="h100", model="gpt-j-6b")
    out = predict(s, 1, 1)
    # 5.844e9 streamed parameters x 2 bytes over 3.35 TB/s; KV and activations add < 0.2%
    assert out["step_ms"] == pytest.approx(5_844_444_384 * 2 / 3.35e12 * 1e3, rel=2e-3)
    assert out["bound"] == "memory"


def test_keyformer_speedup_grows_with_context_and_batch(setup_of):
    s = setup_of(gpu="a100", model="gpt-j-6b", policy="keyformer", kv_ratio=0.5)
    sp = predict(s, np.array([1, 8, 64]), 8192)["speedup_vs_full"]
    assert np.all(np.diff(sp) > 0) and sp[0] > 1
    sp2 = predict(s, 8, np.array([512, 4096, 32768]))["speedup_vs_full"]
    assert np.all(np.diff(sp2) > 0)
    # at a KV-dominated point the ideal speedup approaches 1 / kv-ratio
    big = predict(s, 64, 32768)
    assert 1.8 < float(big["speedup_vs_full"]) < 2.0


def test_large_batch_becomes_compute_bound(setup_of):
    out = predict(setup_of(gpu="h100", model="llama-3-8b"), 4096, 16)
    assert out["bound"] == "compute"


def test_memory_fit_and_max_batch(setup_of):
    s = setup_of(gpu="a100", model="gpt-j-6b")
    out = predict(s, 1, 4096)
    room = 80e9 - 6_050_882_784 * 2
    per_seq = 4096 * 458_752 + 50400 * 4
    assert int(out["max_batch"]) == int(room // per_seq)
    assert predict(s, int(out["max_batch"]), 4096)["fits"]
    assert not predict(s, int(out["max_batch"]) + 1, 4096)["fits"]
    # keeping 20% of the cache lets about 5x the batch fit
    kf = predict(setup_of(gpu="a100", model="gpt-j-6b", policy="keyformer", kv_ratio=0.2), 1, 4096)
    assert 4.5 < kf["max_batch"] / out["max_batch"] < 5.01


def test_request_cache_and_ttft(setup_of):
    s = setup_of(gpu="h100", model="mpt-7b", policy="keyformer", kv_ratio=0.5)
    cached = request_cached(s, 1000, 5)
    assert list(cached) == [500] * 4  # budget fixed at half the prompt, one in one out
    full = request_cached(s.with_policy(__import__("kfsim.policy").policy.Policy()), 1000, 5)
    assert list(full) == [1001, 1002, 1003, 1004]
    out = predict(s, 1, 1000, prompt_len=4096, gen_len=4096)
    assert out["total_ms"] > out["ttft_ms"] > 0
    assert out["request_speedup_vs_full"] > 1


def test_long_prefill_is_compute_bound(setup_of):
    from kfsim.predict import prefill_time
    from kfsim.roofline import bound_of

    t = prefill_time(setup_of(gpu="h100", model="llama-3-8b"), 1, 8192)
    assert bound_of(t) == "compute"


def test_sliding_window_caps_the_cache(setup_of):
    s = setup_of(model="mistral-7b")
    a, b = predict(s, 1, np.array([4096, 16384]))["kv_read_bytes"]
    assert a == b


def test_gqa_reads_fewer_kv_bytes(setup_of):
    l3 = predict(setup_of(model="llama-3-8b"), 1, 8192)
    l2 = predict(setup_of(model="llama-2-7b"), 1, 8192)
    assert float(l2["kv_read_bytes"]) == pytest.approx(4 * float(l3["kv_read_bytes"]))


def test_kv_dtype_halves_kv(setup_of):
    bf = predict(setup_of(), 4, 4096)
    f8 = predict(setup_of(kv_dtype="fp8"), 4, 4096)
    i4 = predict(setup_of(kv_dtype="int4"), 4, 4096)
    # int4 in groups of 32 with an fp16 scale and zero point: 5 bits a value, 16 / 5 = 3.2x fewer than bf16
    assert float(f8["kv_read_bytes"]) * 2 == float(bf["kv_read_bytes"]) == pytest.approx(float(i4["kv_read_bytes"]) * 3.2)


@pytest.mark.parametrize("dtype, streamed", [
    ("bf16", 11_688_888_768),   # (6,050,882,784 parameters - 50,400 x 4,096 embedding rows, looked up) x 2 bytes
    ("int8", 5_844_444_384),    # x 1 byte
    ("int4", 3_652_777_740),    # x 5/8: 4-bit values + a 32-bit scale and zero per 32
    ("int4-g128", 3_104_861_079),  # x 4.25/8: the same per 128
])
def test_gptj_weight_bytes_by_dtype_hand_count(setup_of, dtype, streamed):
    out = predict(setup_of(model="gpt-j-6b", weight_dtype=dtype), 1, 1024)
    assert float(out["weight_bytes"]) == pytest.approx(streamed, abs=1)


def test_bad_values_are_user_errors(setup_of):
    s = setup_of()
    with pytest.raises(KfsimError, match="batch 0 is out of range"):
        predict(s, 0, 10)
    with pytest.raises(KfsimError, match="kv-ratio 1.5 is out of range"):
        setup_of(policy="keyformer", kv_ratio=1.5)
    with pytest.raises(KfsimError, match="no bf16 rate"):  # asked for explicitly; by default V100 runs fp16
        predict(setup_of(gpu="v100", weight_dtype="bf16"), 1, 10)
    assert str(setup_of(gpu="v100").dtypes.compute) == "fp16"
    assert predict(setup_of(gpu="v100", weight_dtype="fp16"), 1, 10)["step_ms"] > 0


def test_fused_scorer_bounds_a_keyformer_step_by_its_arithmetic(setup_of):
    """With the scorer inside the attention kernel, that kernel takes at least its arithmetic at the vector peak,
    whatever the bandwidth; with none (0) the step is the plain roofline's."""
    import dataclasses

    from kfsim.engine import IDEAL

    base = setup_of(gpu="h100", model="llama-3-8b", engine="ideal", policy="keyformer", kv_ratio=0.5)
    fused = dataclasses.replace(base, engine=dataclasses.replace(IDEAL, keyformer_flops_per_kv_byte=200.0))
    r0, r1 = predict(base, 64, 8192), predict(fused, 64, 8192)
    kernel_s = 200.0 * float(r1["kv_bytes"]) / (base.hw.peak_dense_tflops["fp32"] * 1e12)
    assert float(r1["step_ms"]) >= kernel_s * 1e3
    assert float(r1["step_ms"]) > float(r0["step_ms"])
    # more bandwidth no longer shortens the attention kernel once its arithmetic binds
    fast = dataclasses.replace(fused, hw=dataclasses.replace(fused.hw, hbm_bandwidth_gbps=10 * fused.hw.hbm_bandwidth_gbps))
    assert float(predict(fast, 64, 8192)["step_ms"]) >= kernel_s * 1e3
    # the breakdown by op still adds up to the step (the ideal engine has no fixed cost outside the ops)
    from kfsim.predict import step_time

    t = step_time(fused, 64, 4096)
    assert sum(float(v) for v in t.per_op.values()) == pytest.approx(float(t.seconds), rel=1e-9)
    # full cache: no scorer, no change
    full = dataclasses.replace(fused, policy=setup_of(gpu="h100", model="llama-3-8b").policy)
    assert float(predict(full, 64, 8192)["step_ms"]) == float(predict(setup_of(gpu="h100", model="llama-3-8b",
                                                                               engine="ideal"), 64, 8192)["step_ms"])


def test_matrix_vector_kernels_apply_up_to_their_batch(setup_of):
    """An engine with matrix-vector kernels streams weights at their fraction, with their kernel counts, at batches
    up to matvec_max_batch only; larger batches and prefill are priced as without them."""
    import dataclasses

    from kfsim.engine import Engine
    from kfsim.predict import prefill_time, step_time

    gemm = Engine(name="gemm", weight_bandwidth_fraction=0.8, kernel_overhead_us=3.0)
    mv = dataclasses.replace(gemm, name="mv", matvec_max_batch=1.0, matvec_bandwidth_fraction=0.9,
                             matvec_kernels_per_op={"norm": 0.0, "elementwise": 0.0})
    s = setup_of(gpu="h100", model="llama-3-8b")
    a, b = dataclasses.replace(s, engine=gemm), dataclasses.replace(s, engine=mv)
    ra, rb = predict(a, np.array([1, 2]), 4096), predict(b, np.array([1, 2]), 4096)
    # batch 1: weights at 0.9 of the bandwidth (hand count: the weight time scales by 0.8 / 0.9) and no norm or
    # elementwise kernels (2 norms + 2 rotary + 1 activation + 2 residuals per layer, 32 layers, 3 once per step)
    assert rb["weights_ms"][0] == pytest.approx(ra["weights_ms"][0] * 0.8 / 0.9, rel=1e-9)
    assert ra["kernels"][0] - rb["kernels"][0] == 32 * (2 + 2 + 1 + 2) + 3
    assert rb["step_ms"][0] < ra["step_ms"][0]
    # batch 2 and prefill: the GEMM path
    assert rb["step_ms"][1] == ra["step_ms"][1] and rb["kernels"][1] == ra["kernels"][1]
    assert float(prefill_time(b, 1, 512).seconds) == float(prefill_time(a, 1, 512).seconds)
    assert float(step_time(b, 1, 4096).seconds) * 1e3 == pytest.approx(rb["step_ms"][0], rel=1e-12)


def test_slower_matrix_vector_kernels_are_refused(tmp_path):
    """A stack switches to matrix-vector kernels because they are faster; an engine file saying otherwise would
    make a batch of 1 slower than a batch of 2, so it is a user error naming both values."""
    from kfsim.engine import get_engine

    path = tmp_path / "slow.yaml"
    path.write_text("name: slow\nweight_bandwidth_fraction: 0.8\nmatvec_max_batch: 1\nmatvec_bandwidth_fraction: 0.7\n")
    with pytest.raises(KfsimError, match="matvec_bandwidth_fraction 0.7 is below weight_bandwidth_fraction 0.8"):
        get_engine(str(path))
    path.write_text("name: slow\nmatvec_max_batch: 1\nmatvec_kernels_per_op: {gemm: 2}\n")
    with pytest.raises(KfsimError, match="matvec_kernels_per_op.gemm 2 is above kernels_per_op.gemm 1"):
        get_engine(str(path))
    path.write_text("name: slow\nmatvec_max_batch: 1\nmatvec_kernels_per_op: {gemv: 0}\n")
    with pytest.raises(KfsimError, match="unknown op kind 'gemv' in matvec_kernels_per_op"):
        get_engine(str(path))


def test_an_engine_file_s_caveats_are_checked_and_written_back(tmp_path):
    """A caveat names real policies and says something; an engine writes its caveats back as it read them."""
    from kfsim.engine import get_engine

    path = tmp_path / "e.yaml"
    path.write_text("name: e\ncaveats: [{note: slow here, policies: [ful]}]\n")
    with pytest.raises(KfsimError, match="caveat policy 'ful' is not a policy; allowed: full, keyformer"):
        get_engine(str(path))
    path.write_text("name: e\ncaveats: [{note: ' '}]\n")
    with pytest.raises(KfsimError, match="caveat's note is empty"):
        get_engine(str(path))
    path.write_text("name: e\ncaveats: [{note: slow here, policies: [full], sliding_window: true}]\n")
    engine = get_engine(str(path))
    engine.write(tmp_path / "again.yaml")
    assert get_engine(str(tmp_path / "again.yaml")) == engine
    assert engine.caveats_for(get_workload("mistral-7b"), "full") == ["slow here"]
    assert engine.caveats_for(get_workload("llama-3-8b"), "full") == []
    assert "caveats" not in get_engine("default").to_yaml()


def test_a_short_prompt_caveat_covers_the_first_token_of_short_prompts_only(tmp_path):
    """A caveat with max_prompt is a miss of the time to first token: said for prompts up to that length, never
    beside a decode step; a bad length is named."""
    from kfsim.engine import get_engine

    path = tmp_path / "e.yaml"
    path.write_text("name: e\ncaveats: [{note: slow prompt, policies: [keyformer], max_prompt: 512}]\n")
    engine = get_engine(str(path))
    engine.write(tmp_path / "again.yaml")
    assert get_engine(str(tmp_path / "again.yaml")) == engine
    w = get_workload("llama-3-8b")
    assert engine.caveats_for(w, "keyformer") == []
    assert engine.caveats_for(w, "keyformer", 512) == ["slow prompt"]
    assert engine.caveats_for(w, "keyformer", 513) == []
    assert engine.caveats_for(w, "full", 128) == []
    for bad, said in (("0", "caveat max_prompt 0 is not a token count"), ("many", "expected a whole number")):
        path.write_text(f"name: e\ncaveats: [{{note: slow, max_prompt: {bad}}}]\n")
        with pytest.raises(KfsimError, match=said):
            get_engine(str(path))


@pytest.mark.parametrize("engine, policy, ratio", [("default", None, 1.0), ("hf-eager", "keyformer", 0.3),
                                                   ("compiled", "h2o", 0.1)])
def test_a_long_generation_priced_from_sampled_steps_moves_by_under_a_thousandth(engine, policy, ratio):
    """Beyond PRICED_STEPS generated tokens a request is priced from evenly spread steps (plan --gen-len 1e6
    once needed gigabytes); against the step-by-step sum the total moves by less than 0.1 %."""
    s = make_setup(gpu="a100", model="mpt-7b", engine=engine, policy=policy, kv_ratio=ratio)
    B = np.array([1, 8, 64])
    cached = request_cached(s, 1000, 6 * predict_module.PRICED_STEPS + 7)
    exact = predict_module.step_time(s, B[:, None], cached).seconds.sum(axis=-1)
    assert np.allclose(predict_module._decode_seconds(s, B, cached), exact, rtol=1e-3, atol=0)


def test_keyformer_at_kv_ratio_one_pays_its_scorer():
    """`--policy keyformer --kv-ratio 1` was once answered as the full cache: a Keyformer decoder scores at any
    budget, so the step is slower by the scorer's work while the KV read is the same."""
    full = predict(make_setup(gpu="h100", model="gpt-j-6b"), 1, 4096)
    kf = predict(make_setup(gpu="h100", model="gpt-j-6b", policy="keyformer", kv_ratio=1.0), 1, 4096)
    assert kf["kv_bytes"] == full["kv_bytes"] and kf["step_ms"] > full["step_ms"] * 1.05
