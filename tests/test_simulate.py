"""kfsim simulate: queueing results computable by hand with constant step times, memory accounting (Keyformer
holds more requests in the same memory), preemption, request streams and the command's errors."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from kfsim import simulate as sim
from kfsim.cli import cli
from kfsim.errors import KfsimError
from kfsim.inputs import make_setup


class Constant:
    """Step times of a made-up deployment: a decode step takes `d` s whatever the batch, a prompt chunk `p` s, a
    step doing both d + p; each cached token holds 1 byte of `capacity`."""

    per_request, per_token = 0.0, 1.0

    def __init__(self, d=0.01, p=0.05, capacity=1e12, evicts=False, ratio=1.0):
        self.d, self.p, self.capacity, self.ratio = d, p, capacity, ratio
        self.setup = SimpleNamespace(policy=SimpleNamespace(evicts=evicts), workload=SimpleNamespace(sliding_window=None))

    def decode_s(self, batch, cached):
        return np.full(np.shape(cached), self.d)

    def step_s(self, batch, cached, prompt_tokens):
        return (self.d if batch else 0.0) + (self.p if prompt_tokens else 0.0)

    def budget(self, prompt):
        return np.ceil(self.ratio * np.asarray(prompt)) if self.setup.policy.evicts else np.asarray(prompt)


def stream(arrivals, prompt=100, gen=5):
    n = len(arrivals)
    return sim.Requests(np.asarray(arrivals, dtype=float), np.full(n, prompt), np.full(n, gen))


def test_one_request_takes_its_prefill_then_one_step_per_token():
    r = sim.simulate(Constant(), stream([0.0]), max_batch=8, chunk_tokens=512)
    assert r.ttft_s[0] == pytest.approx(0.05)  # the prompt's step gives the first token
    assert r.e2e_s[0] == pytest.approx(0.05 + 4 * 0.01)
    assert r.tpot_s[0] == pytest.approx(0.01)


def test_a_queue_of_one_server_grows_by_the_service_time_minus_the_gap():
    """D/D/1: one request at a time (batch cap 1), service S = 0.05 + 4 x 0.01 = 0.09 s, arrivals every 0.05 s:
    request k starts at 0.09 k, so it waits 0.04 k longer than request 0."""
    r = sim.simulate(Constant(), stream(0.05 * np.arange(10)), max_batch=1, chunk_tokens=512)
    k = np.arange(10)
    assert np.allclose(r.e2e_s, 0.09 + 0.04 * k) and np.allclose(r.ttft_s, 0.05 + 0.04 * k)
    assert r.makespan_s == pytest.approx(0.9) and r.peak_batch == 1


def test_an_underloaded_server_never_queues():
    r = sim.simulate(Constant(), stream(0.2 * np.arange(20)), max_batch=1, chunk_tokens=512)
    assert np.allclose(r.e2e_s, 0.09)


def test_continuous_batching_shares_decode_steps():
    """Two requests at once, batch cap 2, a token budget holding both prompts: one prefill step for both, then
    four shared decode steps."""
    r = sim.simulate(Constant(), stream([0.0, 0.0]), max_batch=2, chunk_tokens=512)
    assert np.allclose(r.ttft_s, 0.05) and np.allclose(r.e2e_s, 0.09) and r.peak_batch == 2


def test_chunked_prefill_splits_a_long_prompt_over_steps():
    """A 1,000-token prompt in 256-token chunks: 4 prefill steps (the last gives the first token)."""
    r = sim.simulate(Constant(), stream([0.0], prompt=1000, gen=1), max_batch=1, chunk_tokens=256)
    assert r.ttft_s[0] == pytest.approx(4 * 0.05) and r.e2e_s[0] == pytest.approx(4 * 0.05)


def test_memory_caps_the_batch_and_keyformer_holds_more():
    """500 bytes of room, 100-token prompts growing to 104: the full cache admits 5 (their prompts fill the room)
    and must preempt one as they grow; Keyformer at 0.25 holds 25 tokens a request after the prompt, so more run
    in the same memory, none preempted."""
    req = stream(np.zeros(40), prompt=100, gen=5)
    full = sim.simulate(Constant(capacity=500), req, max_batch=64, chunk_tokens=10_000)
    kf = sim.simulate(Constant(capacity=500, evicts=True, ratio=0.25), req, max_batch=64, chunk_tokens=10_000)
    assert full.peak_batch == 5 and full.peak_memory_bytes <= 500 and full.preemptions >= 1
    assert kf.peak_batch > full.peak_batch and kf.makespan_s < full.makespan_s and kf.preemptions == 0
    assert np.isfinite(full.e2e_s).all() and np.isfinite(kf.e2e_s).all()


def test_a_growing_cache_is_preempted_and_finishes_later():
    """Two requests whose caches outgrow 230 bytes together: the newer is preempted, recomputed, and finishes."""
    r = sim.simulate(Constant(capacity=230), stream([0.0, 0.0], prompt=100, gen=40), max_batch=2, chunk_tokens=1000)
    assert r.preemptions >= 1 and np.isfinite(r.e2e_s).all() and r.peak_memory_bytes <= 230


def test_keyformer_holds_more_requests_than_the_full_cache_on_a_gpu():
    """The model's own step times and memory (H100, Llama-3-8B, 8k prompts all at once)."""
    req = stream(np.zeros(200), prompt=8192, gen=32)
    peaks = {}
    for ratio in (1.0, 0.5):
        s = make_setup(gpu="h100", model="llama-3-8b", engine="ideal", kv_ratio=ratio,
                       policy=None if ratio == 1 else "keyformer")
        times = sim.StepTimes(s, 200, 8192 + 32, 2048)
        peaks[ratio] = sim.simulate(times, req, max_batch=200, chunk_tokens=2048).peak_batch
    assert peaks[0.5] > peaks[1.0] > 0


def test_summary_percentiles_and_goodput():
    r = sim.simulate(Constant(), stream(0.05 * np.arange(10)), max_batch=1, chunk_tokens=512)
    out = sim.summary(r, stream(0.05 * np.arange(10)), slo_ttft_ms=150)
    assert out["ttft_p50_ms"] == pytest.approx(np.percentile(50 + 40 * np.arange(10), 50))
    assert out["slo_attained"] == pytest.approx(0.3)  # TTFT 50, 90, 130 ms meet 150 ms
    assert out["goodput_requests_per_s"] == pytest.approx(3 / 0.9)
    assert out["throughput_tokens_per_s"] == pytest.approx(50 / 0.9)


def test_poisson_stream_and_length_specs():
    req = sim.poisson_requests(10.0, 20_000, "uniform:10:20", "normal:100:10", seed=1)
    assert req.arrival_s[0] == 0 and np.all(np.diff(req.arrival_s) >= 0)
    assert np.mean(np.diff(req.arrival_s)) == pytest.approx(0.1, rel=0.05)
    assert req.prompt.min() >= 10 and req.prompt.max() <= 20 and abs(req.gen.mean() - 100) < 1
    for bad in ("0", "x", "uniform:5:2", "normal:0:1", "pareto:1:2"):
        with pytest.raises(KfsimError, match="allowed"):
            sim.lengths(bad, 3, np.random.default_rng(0), "prompt-len")


def test_trace_file(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("arrival_s,prompt_tokens,gen_tokens\n0.5,100,10\n0.0,200,20\n")
    req = sim.read_trace(str(p))
    assert req.arrival_s.tolist() == [0.0, 0.5] and req.prompt.tolist() == [200, 100]
    p.write_text("arrival_s,prompt_tokens,gen_tokens\n0,1.5,2\n")
    with pytest.raises(KfsimError, match="line 2: prompt_tokens '1.5'"):
        sim.read_trace(str(p))
    p.write_text("when,prompt\n0,1\n")
    with pytest.raises(KfsimError, match="needs a header"):
        sim.read_trace(str(p))


def run(*args):
    return CliRunner().invoke(cli, ["simulate", *args])


def test_simulate_json():
    r = run("--model", "llama-3-8b", "--gpu", "h100", "--rate", "2", "--requests", "200", "--prompt-len", "2048",
            "--gen-len", "128", "--kv-ratio", "0.5", "--slo-ttft-ms", "2000", "--slo-tpot-ms", "50", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["requests"] == 200 and out["policy"] == "keyformer"
    for key in ("ttft_p50_ms", "ttft_p99_ms", "tpot_p90_ms", "e2e_p99_ms", "throughput_tokens_per_s",
                "goodput_requests_per_s", "peak_batch", "peak_memory_bytes", "preemptions"):
        assert key in out and math.isfinite(out[key])


@pytest.mark.parametrize("args, message", [
    ([], "give either --rate"),
    (["--rate", "1", "--trace", "x.csv"], "give either --rate"),
    (["--rate", "1", "--prompt-len", "uniform:9:1"], "--prompt-len 'uniform:9:1'"),
    (["--rate", "0"], "--rate"),
    (["--rate", "1", "--tp", "3"], "allowed: 1, 2, 4, 8"),
    (["--trace", "/no/such.csv"], "cannot read it"),
])
def test_simulate_errors_are_one_line(args, message):
    r = run(*args)
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
