"""Bad YAML and bad values give one-line errors that name the file and key."""
import pytest

from kfsim.errors import KfsimError
from kfsim.hardware import Hardware, get_hardware
from kfsim.loader import load
from kfsim.workload import get_workload

GOOD_GPU = """name: mygpu
description: test
memory_gb: 10
hbm_bandwidth_gbps: 100
peak_dense_tflops: {fp32: 1, tf32: 2, bf16: 4, fp16: 4, fp8: null, int8: 8}
l2_mb: 1
sm_count: 10
interconnect_gbps: 0
tdp_w: 100
source: {memory_gb: a, hbm_bandwidth_gbps: b, peak_dense_tflops: c, l2_mb: d, sm_count: e, interconnect_gbps: f,
  tdp_w: g}
"""


def write(tmp_path, text, name="mygpu.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_file_by_path(tmp_path):
    hw = get_hardware(str(write(tmp_path, GOOD_GPU)))
    assert hw.hbm_bandwidth_gbps == 100 and hw.peak_dense_tflops["fp8"] is None


@pytest.mark.parametrize("edit, message", [
    (("memory_gb: 10", "memory_gb: -1"), "memory_gb: -1.0 must be greater than 0"),
    (("memory_gb: 10", "memory_gb: lots"), "memory_gb: expected a number, got 'lots'"),
    (("l2_mb: 1", "l2_mb: 1\nbandwith: 3"), "unknown key 'bandwith'"),
    (("sm_count: 10\n", ""), "missing required key 'sm_count'"),
    (("fp8: null, ", ""), "missing ['fp8']"),
    (("tdp_w: g}", "}"), "no source for tdp_w"),
    (("name: mygpu", "name: [oops"), "not valid YAML at line 2"),
])
def test_bad_gpu_files(tmp_path, edit, message):
    p = write(tmp_path, GOOD_GPU.replace(*edit))
    with pytest.raises(KfsimError) as e:
        load(Hardware, p)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(p) in str(e.value)


def test_missing_file():
    with pytest.raises(KfsimError, match="no such file"):
        get_hardware("/nonexistent/gpu.yaml")


def test_workload_checks_heads(tmp_path):
    text = (
        "name: bad\ndescription: x\nfamily: llama\nn_layers: 2\nd_model: 64\nn_heads: 6\nn_kv_heads: 4\n"
        "ffn_dim: 128\nvocab_size: 100\nmax_context: 128\nhead_dim: 16\nsource: {architecture: test}\n"
    )
    with pytest.raises(KfsimError, match="n_heads 6 is not a multiple of n_kv_heads 4"):
        get_workload(str(write(tmp_path, text, "bad.yaml")))
    text2 = text.replace("n_heads: 6\nn_kv_heads: 4\n", "n_heads: 5\n").replace("head_dim: 16\n", "")
    with pytest.raises(KfsimError, match="not divisible by n_heads 5; give head_dim"):
        get_workload(str(write(tmp_path, text2, "bad.yaml")))


def test_unknown_name_suggests():
    with pytest.raises(KfsimError, match=r"unknown model 'lama-3-8b' \(did you mean 'llama-3-8b'\?\)"):
        get_workload("lama-3-8b")
