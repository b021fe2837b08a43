"""Tensor parallelism: per-GPU weights and KV against hand counts (Llama-3-70B), all-reduce cost, properties, CLI."""
import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from kfsim.cli import cli
from kfsim.errors import KfsimError
from kfsim.inputs import make_setup
from kfsim.parallel import allreduce_s, shard
from kfsim.predict import predict
from kfsim.workload import get_workload


def run(*args):
    return CliRunner().invoke(cli, list(args))


# Llama-3-70B (HF config.json): 80 layers, d_model 8192, 64 heads and 8 KV heads of 128, SwiGLU FFN 28672,
# vocab 128256, untied head. Per layer at TP n: Q 8192 x 8192/n, K and V 8192 x 1024/n each (one KV head per GPU
# at n = 8), O 8192/n x 8192, FFN 3 x 8192 x 28672/n, two RMSNorms of 8192 (replicated); embedding and LM head
# 128256/n x 8192 each, final norm 8192.
def hand_params(n):
    per_layer = 2 * 8192 * 8192 // n + 2 * 8192 * 1024 // n + 3 * 8192 * 28672 // n + 2 * 8192
    return 80 * per_layer + 2 * 128256 // n * 8192 + 8192


@pytest.mark.parametrize("tp, params, kv_per_token", [
    (2, 35_277_512_704, 163_840),   # 4 KV heads per GPU: 2 x 80 x 4 x 128 x 2 bytes
    (4, 17_639_415_808, 81_920),
    (8, 8_820_367_360, 40_960),     # one KV head per GPU
])
def test_llama3_70b_per_gpu_weights_and_kv_match_hand_counts(tp, params, kv_per_token):
    assert hand_params(tp) == params
    w = shard(get_workload("llama-3-70b"), tp)
    assert w.n_params == params
    assert w.kv_bytes_per_token() == kv_per_token


def test_kv_heads_are_replicated_past_their_count():
    w = shard(get_workload("llama-3-8b"), 8)  # 8 KV heads over 8 GPUs: one each
    assert w.n_kv_heads == 1 and w.n_heads == 4
    with pytest.raises(KfsimError, match="not divisible"):
        shard(get_workload("cerebras-gpt-111m"), 8)  # 12 heads
    with pytest.raises(KfsimError, match="allowed: 1, 2, 4, 8"):
        shard(get_workload("llama-3-8b"), 3)


def test_tp_1_is_the_single_gpu_model():
    a = make_setup(gpu="h100", model="llama-3-8b")
    b = make_setup(gpu="h100", model="llama-3-8b", tp=1)
    pa, pb = predict(a, 16, 4096), predict(b, 16, 4096)
    assert float(pa["step_ms"]) == float(pb["step_ms"]) and float(pb["comm_ms"]) == 0.0


def test_allreduce_is_latency_plus_ring_traffic():
    hw = make_setup(gpu="h100", model="llama-3-8b").hw  # NVLink4: 900 GB/s both ways, 8 us a message
    # 16 MB over 4 GPUs: 8 us + 2 x 3/4 x 16e6 B / 450e9 B/s = 8 + 53.33 us
    assert float(allreduce_s(hw, 16e6, 4)) == pytest.approx(8e-6 + 1.5 * 16e6 / 450e9)
    assert float(allreduce_s(hw, 16e6, 1)) == 0.0


@settings(max_examples=40, deadline=None)
@given(tp=st.sampled_from([2, 4, 8]), batch=st.integers(1, 256), context=st.integers(128, 32768),
       gbps=st.floats(16, 4000), more=st.floats(1.0, 10.0))
def test_step_never_rises_with_more_interconnect_bandwidth(tp, batch, context, gbps, more):
    s = make_setup(gpu="h100", model="llama-3-70b", engine="default", tp=tp)
    slow = dataclasses.replace(s, hw=dataclasses.replace(s.hw, interconnect_gbps=gbps))
    fast = dataclasses.replace(s, hw=dataclasses.replace(s.hw, interconnect_gbps=gbps * more))
    assert float(predict(fast, batch, context)["step_ms"]) <= float(predict(slow, batch, context)["step_ms"])


def test_more_gpus_hold_more_sequences():
    batches = [int(predict(make_setup(gpu="h100", model="llama-3-70b", tp=n), 1, 8192)["max_batch"])
               for n in (2, 4, 8)]
    assert 0 < batches[0] < batches[1] < batches[2]


def test_predict_llama3_70b_tp4_fits_with_communication():
    r = run("predict", "--model", "llama-3-70b", "--gpu", "h100", "--tp", "4", "--seq", "8192", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["tp"] == 4 and out["fits"] is True and out["comm_ms"] > 0
    alone = json.loads(run("predict", "--model", "llama-3-70b", "--gpu", "h100", "--seq", "8192", "--json").output)
    assert alone["fits"] is False and alone["comm_ms"] == 0


@pytest.mark.parametrize("gpu", ["a100", "h100", "h200"])
def test_plan_finds_llama3_70b_at_8k_on_several_gpus(gpu):
    r = run("plan", "--model", "llama-3-70b", "--prompt-len", "8192", "--gen-len", "256", "--target-tokens-per-s",
            "1000", "--gpus", gpu, "--kv-ratio", "1", "--json")
    assert r.exit_code == 0, r.output
    feasible = [o for o in json.loads(r.output) if o["feasible"]]
    assert feasible and all(o["tp"] >= 2 and o["gpus_needed"] % o["tp"] == 0 for o in feasible)


@pytest.mark.parametrize("args, message", [
    (["predict", "--model", "llama-3-8b", "--gpu", "h100", "--seq", "64", "--tp", "3"], "allowed: 1, 2, 4, 8"),
    (["predict", "--model", "cerebras-gpt-111m", "--gpu", "h100", "--seq", "64", "--tp", "8"], "not divisible"),
    (["plan", "--model", "llama-3-8b", "--prompt-len", "8", "--gen-len", "8", "--target-tokens-per-s", "1",
      "--tp", "1,6"], "--tp: 6 is not allowed"),
    (["sweep", "--seq", "64", "--tp", "5"], "allowed: 1, 2, 4, 8"),
])
def test_bad_tp_is_a_one_line_error(args, message):
    r = run(*args)
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_a_profile_without_interconnect_latency_cannot_split(tmp_path):
    s = make_setup(gpu="h100", model="llama-3-70b", tp=2)
    bare = dataclasses.replace(s, hw=dataclasses.replace(s.hw, interconnect_latency_us=None))
    with pytest.raises(KfsimError, match="interconnect_latency_us"):
        predict(bare, 1, 1024)
    assert np.isfinite(float(predict(dataclasses.replace(bare, tp=1), 1, 1024)["step_ms"]))
