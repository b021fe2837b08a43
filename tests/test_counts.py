"""Formulas against hand counts for real models (GPT-J-6B and Llama-3-8B)."""
import numpy as np
import pytest

from kfsim.dtypes import DType
from kfsim.ops import Dtypes, decode_ops, prefill_ops
from kfsim.policy import Policy
from kfsim.workload import get_workload


def total(ops, field):
    return float(sum(np.sum(getattr(o, field)) for o in ops))


def test_dtype_widths():
    # 4-bit values (0.5 bytes, not 4 // 8 == 0) plus an fp16 scale and zero point per 32 (per 128): 5 (4.25) bits
    assert DType.INT4.bits == 4 and DType.INT4.bytes == 0.625 and DType.INT4_G128.bytes == 4.25 / 8
    assert DType.BF16.bytes == 2 and DType.FP8.bytes == 1 and DType.FP32.bytes == 4


def test_gptj_parameters_by_hand():
    w = get_workload("gpt-j-6b")
    embed = 50400 * 4096                                  # 206,438,400
    attn = 4 * 4096 * 4096                                # q, k, v, out: no biases in GPT-J
    mlp = 2 * 4096 * 16384 + 16384 + 4096                 # fc_in, fc_out with biases
    ln = 2 * 4096                                          # one LayerNorm per (parallel) block
    head = 50400 * 4096 + 50400                            # untied, with bias
    expected = embed + 28 * (attn + mlp + ln) + ln + head
    assert expected == 6_050_882_784
    assert w.n_params == expected
    assert w.streamed_params == expected - embed
    assert w.kv_bytes_per_token() == 458_752              # 2 x 28 x 16 x 256 x 2 bytes


def test_llama3_gqa_by_hand():
    w = get_workload("llama-3-8b")
    embed = 128256 * 4096
    attn = 4096 * 4096 * 2 + 2 * 4096 * 1024              # q, o full; k, v over 8 KV heads of 128
    mlp = 3 * 4096 * 14336
    norms = 2 * 4096
    expected = embed + 32 * (attn + mlp + norms) + 4096 + embed
    assert w.n_params == expected == 8_030_261_248
    assert w.kv_bytes_per_token() == 131_072              # 2 x 32 x 8 x 128 x 2 bytes
    assert w.kv_bytes_per_token(DType.FP8) == 65_536
    assert w.kv_bytes_per_token(DType.INT4) == 40_960             # 2 x 32 x 8 x 128 x 5/8 bytes


@pytest.mark.parametrize("model", ["gpt-j-6b", "llama-3-8b", "mpt-7b", "cerebras-gpt-111m", "llama-2-70b"])
def test_decode_weight_bytes_are_streamed_params(model):
    w = get_workload(model)
    ops = decode_ops(w, Policy(), Dtypes.of(w), 3, 100)
    assert total(ops, "weight_bytes") == w.streamed_params * 2


def test_gptj_decode_step_by_hand():
    w = get_workload("gpt-j-6b")
    B, n = 2, 1000
    ops = decode_ops(w, Policy(), Dtypes.of(w), B, n)
    by = {o.name: o for o in ops}
    gemm_flops = sum(float(o.flops) for o in ops if o.kind == "gemm")
    assert gemm_flops == 2 * B * (28 * (4 * 4096 * 4096 + 2 * 4096 * 16384) + 4096 * 50400)
    assert float(by["attention"].kv_read_bytes) == B * n * 458_752
    assert float(by["attention"].kv_write_bytes) == B * 458_752
    assert float(by["attention"].flops) == 28 * B * 16 * n * (4 * 256 + 5)


def test_keyformer_reads_only_its_budget():
    w = get_workload("gpt-j-6b")
    dt = Dtypes.of(w)
    pol = Policy("keyformer", 0.5)
    k = pol.budget(np.array(4096))
    assert int(k) == 2048
    ops = {o.name: o for o in decode_ops(w, pol, dt, 1, k)}
    assert float(ops["attention"].kv_read_bytes) == 2048 * 458_752
    # score state: fp32 read + write per cached token, per layer and KV head
    assert float(ops["keyformer_score"].other_bytes) == 28 * 2048 * 16 * 8


def test_prefill_flops_by_hand():
    w = get_workload("llama-3-8b")
    B, P = 1, 512
    ops = {o.name: o for o in prefill_ops(w, Policy(), Dtypes.of(w), B, P)}
    per_token = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    assert float(ops["gemms"].flops) == 2 * B * P * per_token
    assert float(ops["attention"].flops) == 32 * 32 * B * P * (P + 1) / 2 * (4 * 128 + 5)
    assert float(ops["attention"].kv_write_bytes) == B * P * 131_072
