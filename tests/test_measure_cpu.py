"""measure/ on the CPU: the decoder for every family, Keyformer's selection against a plain reference, resuming."""
import dataclasses
import math

import pytest

torch = pytest.importorskip("torch")

from kfsim import measurements  # noqa: E402
from kfsim.errors import KfsimError  # noqa: E402
from kfsim.workload import get_workload  # noqa: E402
from measure import campaign  # noqa: E402
from measure.decoder import build, slopes_of  # noqa: E402
from measure.kv_policies import TAU_INIT, EvictingCache, FullCache, make_cache  # noqa: E402


def tiny(name):
    """The real architecture of `name`, shrunk so it runs in milliseconds on a CPU."""
    w = get_workload(name)
    heads, kv = (4, 2) if w.n_kv_heads < w.n_heads else (4, 4)
    return dataclasses.replace(w, n_layers=2, d_model=64, n_heads=heads, n_kv_heads=kv, head_dim=16, ffn_dim=96,
                               vocab_size=101, max_context=64, rotary_dim=8 if w.family == "gptj" else None)


FAMILIES = ["gpt-j-6b", "cerebras-gpt-111m", "mpt-7b", "llama-3-8b"]


def generate(model, w, caches, prompt, steps):
    logits = [model.prefill(prompt, caches)]
    token = logits[-1].argmax(-1)
    for i in range(steps):
        logits.append(model.decode(token, prompt.shape[1] + i, caches))
        token = logits[-1].argmax(-1)
    return torch.stack(logits)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("kind", ["keyformer", "h2o", "window"])
def test_budget_of_everything_equals_full(name, kind):
    """An evicting cache large enough to keep every token gives the full cache's logits (its own code path)."""
    w = tiny(name)
    torch.manual_seed(0)
    model = build(w, dtype=torch.float32, device="cpu")
    prompt = torch.randint(0, w.vocab_size, (2, 12))
    steps = 6
    full = [FullCache(2, w.n_kv_heads, 32, w.head_dim, torch.float32, "cpu", slopes_of(w))
            for _ in range(w.n_layers)]
    evict = [EvictingCache(kind, 2, w.n_kv_heads, 12 + steps + 2, 3, w.head_dim, torch.float32, "cpu")
             for _ in range(w.n_layers)]
    with torch.no_grad():
        a = generate(model, w, full, prompt, steps)
        b = generate(model, w, evict, prompt, steps)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_reduced_cache_changes_logits():
    """The check above can fail: a real budget does change the answer."""
    w = tiny("llama-3-8b")
    torch.manual_seed(0)
    model = build(w, dtype=torch.float32, device="cpu")
    prompt = torch.randint(0, w.vocab_size, (1, 24))
    full = [FullCache(1, w.n_kv_heads, 40, w.head_dim, torch.float32, "cpu") for _ in range(w.n_layers)]
    kf = [EvictingCache("keyformer", 1, w.n_kv_heads, 6, 2, w.head_dim, torch.float32, "cpu")
          for _ in range(w.n_layers)]
    with torch.no_grad():
        assert not torch.allclose(generate(model, w, full, prompt, 3), generate(model, w, kf, prompt, 3), atol=1e-3)


def planted(P=40, D=16, heavy=(3, 11, 25)):
    """Keys: random small, except `heavy` tokens aligned with every query; returns q, k, v."""
    torch.manual_seed(1)
    q_dir = torch.randn(D)
    q_dir /= q_dir.norm()
    k = 0.1 * torch.randn(1, 1, P, D)
    for h in heavy:
        k[0, 0, h] = 6 * q_dir
    q = (q_dir * 4).expand(1, 1, P, D).clone()
    return q, k, torch.randn(1, 1, P, D), q_dir


@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32])  # int32: the fused kernels' pos32 option
@pytest.mark.parametrize("kind", ["keyformer", "h2o"])
def test_planted_heavy_tokens_are_kept(kind, pos_dtype):
    heavy = (3, 11, 25)
    q, k, v, q_dir = planted(heavy=heavy)
    cache = EvictingCache(kind, 1, 1, budget=8, window=4, head_dim=16, dtype=torch.float32, device="cpu")
    cache.pos = cache.pos.to(pos_dtype)
    cache.prefill(q, k, v)
    kept = set(cache.pos[0, 0, :8].tolist())
    assert set(heavy) <= kept and {36, 37, 38, 39} <= kept  # key tokens + recent window
    for step in range(10):  # decoding keeps them: new tokens are light and age out of the window
        cache.decode((q_dir * 4).view(1, 1, 1, 16), 0.1 * torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16), 40 + step)
    kept = set(cache.pos[0, 0].tolist())
    assert set(heavy) <= kept and cache.pos.dtype == pos_dtype
    assert len(kept - {-1, -2}) == cache.used == 9  # a full cache: budget + the newest token


@pytest.mark.parametrize("kind", ["keyformer", "h2o"])
def test_compiled_decode_writes_and_evicts_as_eager(kind):
    """EvictingCache.write takes index_put_ under torch.compile and scatter_ eagerly: the same cache after
    each step (the token written into the free slot, the same slot freed next)."""
    torch.manual_seed(0)
    q, k, v, _ = planted()
    caches = []
    for _ in range(2):
        c = EvictingCache(kind, 1, 1, budget=8, window=4, head_dim=16, dtype=torch.float32, device="cpu")
        c.noise = torch.zeros_like
        c.prefill(q, k, v)
        caches.append(c)
    eager, compiled = caches
    step = torch.compile(compiled.decode, fullgraph=True)
    for t in range(4):
        qn, kn, vn = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
        out_e = eager.decode(qn, kn, vn, torch.tensor(40 + t))
        out_c = step(qn, kn, vn, torch.tensor(40 + t))
        assert torch.allclose(out_e, out_c, atol=1e-5)
        for name in ("k", "v", "pos", "free"):
            assert torch.equal(getattr(eager, name), getattr(compiled, name)), (t, name)
        assert torch.allclose(eager.score, compiled.score, atol=1e-5)


def test_window_keeps_most_recent():
    q, k, v, _ = planted()
    cache = EvictingCache("window", 1, 1, budget=8, window=8, head_dim=16, dtype=torch.float32, device="cpu")
    cache.prefill(q, k, v)
    assert sorted(cache.pos[0, 0, :8].tolist()) == list(range(32, 40))


def reference_step(K, V, pos, score, free, q, k_new, v_new, t, noise, window, tau_delta, kind):
    """A plain, loop-by-loop Keyformer decode step for one sequence and KV head (float64)."""
    K, V, pos, score = K.clone(), V.clone(), list(pos), list(score)
    K[free], V[free], pos[free], score[free] = k_new, v_new, t, 0.0
    G, S = q.shape[0], K.shape[0]
    outs = []
    for g in range(G):
        logits = [float(q[g] @ K[j]) / math.sqrt(K.shape[1]) if pos[j] >= 0 else -math.inf for j in range(S)]
        m = max(logits)
        e = [math.exp(x - m) for x in logits]
        p = [x / sum(e) for x in e]
        outs.append(sum(p[j] * V[j] for j in range(S)))
        if kind == "keyformer":
            tau = TAU_INIT + noise["step"] * tau_delta
            z = [(logits[j] + float(noise["g"][g, j])) / tau if pos[j] >= 0 else -math.inf for j in range(S)]
            mz = max(z)
            ez = [math.exp(x - mz) for x in z]
            f = [x / sum(ez) for x in ez]
        else:
            f = p
        for j in range(S):
            score[j] += f[j]
    candidates = [j for j in range(S) if pos[j] >= 0 and not pos[j] > t - window]
    empty = [j for j in range(S) if pos[j] == -1]  # -2 marks alignment padding: never used
    evict = empty[0] if empty else min(candidates, key=lambda j: score[j])
    return torch.stack(outs), score, evict


@pytest.mark.parametrize("kind", ["keyformer", "h2o"])
def test_decode_matches_plain_reference(kind):
    torch.manual_seed(3)
    B, Hkv, G, D, budget, window = 2, 2, 3, 8, 10, 3
    cache = EvictingCache(kind, B, Hkv, budget, window, D, torch.float64, "cpu", tau_delta=0.05)
    cache.k.normal_()
    cache.v.normal_()
    cache.pos[..., :cache.used] = torch.stack([torch.randperm(30)[:cache.used] for _ in range(B * Hkv)]).view(
        B, Hkv, -1)
    cache.pos[..., 4] = -1  # one empty slot besides the free one in some heads
    cache.score.uniform_()
    cache.free[:] = torch.randint(0, cache.used, (B, Hkv, 1))
    cache.step.fill_(7)
    t = 40
    for _ in range(3):
        q = torch.randn(B, Hkv * G, 1, D, dtype=torch.float64)
        kn, vn = torch.randn(B, Hkv, 1, D, dtype=torch.float64), torch.randn(B, Hkv, 1, D, dtype=torch.float64)
        g = torch.randn(B, Hkv, G, cache.slots, dtype=torch.float64)
        cache.noise = lambda like, g=g: g.to(like.dtype)
        expected = []
        for b in range(B):
            for h in range(Hkv):
                expected.append(reference_step(cache.k[b, h], cache.v[b, h], cache.pos[b, h].tolist(),
                                               cache.score[b, h].tolist(), int(cache.free[b, h]),
                                               q[b, h * G:(h + 1) * G, 0], kn[b, h, 0], vn[b, h, 0], t,
                                               {"g": g[b, h], "step": float(cache.step)}, window, 0.05, kind))
        out = cache.decode(q, kn, vn, t)
        for i, (o, score, evict) in enumerate(expected):
            b, h = divmod(i, Hkv)
            assert torch.allclose(out[b, h * G:(h + 1) * G, 0], o, atol=1e-5)  # logits are fp32
            assert torch.allclose(cache.score[b, h].double(), torch.tensor(score, dtype=torch.float64), atol=1e-6)
            assert int(cache.free[b, h]) == evict
        t += 1


def test_make_cache_sizes():
    full = make_cache("full", 2, 4, 8, 100, 1.0, 0.3, torch.float32, "cpu")
    kf = make_cache("keyformer", 2, 4, 8, 100, 0.2, 0.3, torch.float32, "cpu")
    assert full.slots == 101 and kf.used == 21 and kf.slots == 24 and kf.window == 6
    assert (kf.pos == -2).sum() == 2 * 4 * 3  # alignment slots, never used


def test_grid_pairs_policies_and_ratios():
    pts = campaign.grid(["gpt-j-6b"], [1, 8], [1024], [1, 0.5, 0.2], ["full", "keyformer"], prefill_prompts=[512])
    decode = [(p.policy, p.kv_ratio) for p in pts if p.phase == "decode"]
    assert sorted(set(decode)) == [("full", 1), ("keyformer", 0.2), ("keyformer", 0.5)]
    assert len(pts) == 3 * 2 + 3


def test_rows_append_and_resume(tmp_path):
    out = tmp_path / "m.csv"
    row = {"gpu": "h100-sxm", "model": "gpt-j-6b", "phase": "decode", "engine": "torch-graph", "batch": 1,
           "context": 1024, "kv_ratio": 0.5, "policy": "keyformer", "step_ms": 7.5, "status": "ok"}
    measurements.append_row(out, row)
    measurements.append_row(out, {**row, "batch": 64, "status": "oom", "step_ms": None})
    assert measurements.point_key(row) in measurements.done_keys(out)
    df = measurements.read(out)
    assert len(df) == 1 and df["step_ms"].iloc[0] == 7.5
    with pytest.raises(ValueError):
        measurements.append_row(out, {**row, "bogus": 1})
    # the same point with a kernel option is another point; a shipped-kernel row keys as before the column existed
    assert measurements.point_key({**row, "kernel_options": "write_first"}) not in measurements.done_keys(out)
    assert measurements.point_key({**row, "kernel_options": ""}) == measurements.point_key(row)


class EpisodicRunner:
    """A runner whose host is slow (3x) for the first `slow` measurements it takes, then fast: each point costs
    its batch in ms when the host is fast; batch 64 does not fit."""

    env, engine, kernel_options, profile = {"gpu": "h200"}, "hf-eager", "", False

    def __init__(self, slow):
        self.slow, self.calls = slow, []

    def measure(self, pt, power=True):
        self.calls.append((pt, power))
        row = {"gpu": "h200", "model": pt.model, "phase": pt.phase, "engine": self.engine, "batch": pt.batch,
               "context": pt.context, "kv_ratio": pt.kv_ratio, "policy": pt.policy}
        if pt.batch == 64:
            return {**row, "status": "oom", "step_ms": None}
        ms = pt.batch * (3.0 if len(self.calls) <= self.slow else 1.0)
        return {**row, "status": "ok", "step_ms": ms, "step_ms_p10": ms, "step_ms_p90": ms, "step_ms_min": ms,
                "n_steps": 20, **({"power_w": 100.0, "energy_j": ms / 10} if power else {})}


def test_rounds_keep_each_points_fastest_round(tmp_path):
    """--rounds: every point is timed in each round (power in the first only; a point that failed is not
    retried), and its one row keeps the fastest round's median and lists every round's."""
    points = campaign.grid(["gpt-j-6b", "llama-3-8b"], [1, 2, 64], [1024], [1], ["full"])
    runner = EpisodicRunner(slow=4)  # the first round of gpt-j-6b's points runs on a slow host
    out = tmp_path / "r.csv"
    rows = campaign.run(points, out, runner, echo=lambda m: None, rounds=3, seed=1)
    assert len(rows) == len(points) == 6
    assert len(runner.calls) == 2 * (3 + 2 + 2)  # per model: 3 points, then the 2 that fit, twice more
    assert [p for p, power in runner.calls if power] == points  # the first round, in order, reads power
    assert [p.model for p, _ in runner.calls] == ["gpt-j-6b"] * 7 + ["llama-3-8b"] * 7  # model by model
    df = measurements.read(out)
    gptj = df[(df.model == "gpt-j-6b")].set_index("batch")
    assert list(gptj.step_ms) == [1.0, 2.0]  # slowed in its first round, kept from a fast one
    assert gptj.loc[2, "round_ms"] == "6.000;2.000;2.000" and gptj.loc[2, "rounds"] == 3
    assert gptj.loc[2, "power_w"] == 100.0 and gptj.loc[2, "energy_j"] == 0.6  # read in the first round
    assert len(measurements.done_keys(out)) == 6  # the oom points too: a resumed run skips them
    assert campaign.run(points, out, runner, echo=lambda m: None, rounds=3) == []


def test_rows_append_to_a_file_from_before_a_column(tmp_path):
    """A file begun without the kernel_options column keeps its header: shipped rows go on, option rows are
    refused in one line instead of landing under the wrong header."""
    out = tmp_path / "old.csv"
    old_columns = [c for c in measurements.COLUMNS if c != "kernel_options"]
    row = {"gpu": "h200", "model": "llama-3-8b", "phase": "decode", "engine": "compiled", "batch": 1,
           "context": 4096, "kv_ratio": 1.0, "policy": "full", "step_ms": 6.1, "status": "ok"}
    out.write_text(",".join(old_columns) + "\n")
    measurements.append_row(out, {**row, "kernel_options": ""})
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and lines[1].count(",") == len(old_columns) - 1
    with pytest.raises(KfsimError, match="no column 'kernel_options'"):
        measurements.append_row(out, {**row, "kernel_options": "write_first"})


def test_steady_state_step_keeps_shapes():
    w = tiny("llama-3-8b")
    model = build(w, dtype=torch.float32, device="cpu")
    caches = [make_cache("keyformer", 2, w.n_kv_heads, w.head_dim, 50, 0.5, 0.3, torch.float32, "cpu")
              for _ in range(w.n_layers)]
    for c in caches:
        c.fill_random(50)
    tokens = torch.randint(0, w.vocab_size, (2,))
    with torch.no_grad():
        for _ in range(3):
            logits = model.decode(tokens, torch.tensor(50), caches)
    assert logits.shape == (2, w.vocab_size) and torch.isfinite(logits).all()
    assert caches[0].used == 26 and caches[0].slots == 32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_step_on_gpu():
    runner = campaign.Runner(steps=5, warmup=2)
    row = runner.measure(campaign.Point("cerebras-gpt-111m", "decode", 2, 256, 0.5, "keyformer"))
    assert row["status"] == "ok" and row["step_ms"] > 0


def test_alibi_prompt_is_the_same_with_or_without_the_caches_slopes():
    """An ALiBi model's prompt through full caches that add the bias themselves (slopes: position columns) and
    through caches that take the decoder's float bias: the same logits, and not those without any bias."""
    w = tiny("mpt-7b")
    torch.manual_seed(0)
    model = build(w, dtype=torch.float32, device="cpu")
    prompt = torch.randint(0, w.vocab_size, (2, 10))

    def logits(slopes):
        caches = [FullCache(2, w.n_kv_heads, 16, w.head_dim, torch.float32, "cpu", slopes) for _ in range(w.n_layers)]
        with torch.no_grad():
            return model.prefill(prompt, caches)

    with_slopes, with_bias = logits(slopes_of(w)), logits(None)
    assert torch.allclose(with_slopes, with_bias, atol=1e-5)
    model.blocks[0].attn.slopes = model.blocks[0].attn.slopes * 0  # no bias in the first layer: logits change
    assert not torch.allclose(logits(None), with_bias, atol=1e-3)


@pytest.mark.parametrize("name", FAMILIES)
def test_compiled_glue_matches_decoder(name):
    """The compiled engine's functional layer glue (run here uncompiled) gives the decoder's logits."""
    from measure.compiled import CompiledDecoder

    w = tiny(name)
    torch.manual_seed(0)
    model = build(w, dtype=torch.float32, device="cpu")
    prompt = torch.randint(0, w.vocab_size, (2, 10))
    a, b = ([FullCache(2, w.n_kv_heads, 16, w.head_dim, torch.float32, "cpu", slopes_of(w))
             for _ in range(w.n_layers)] for _ in range(2))
    glue = CompiledDecoder(model, compile=False, l2_persist_mib=24)  # a CPU model: no CUDA context to set L2 in
    with torch.no_grad():
        model.prefill(prompt, a)
        model.prefill(prompt, b)
        token = torch.tensor([3, 7])
        for i in range(3):
            la = model.decode(token, 10 + i, a)
            lb = glue.decode(token, 10 + i, b)
            assert torch.allclose(la, lb, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-3), (torch.bfloat16, 1e-2)])
def test_alibi_full_cache_equals_the_biased_softmax(dtype, tol, device):
    """The full cache of an ALiBi model (a per-head row of biases in fused attention; cuDNN's on a GPU): over a
    context past 256^2 tokens, its decode step equals softmax(q.k / sqrt(D) + slope (j - n)) v (within fp32 rounding
    of logits near slope x 70,000: 3e-4 seen; bf16, whose bias rounds by 2^-9 of itself: 1e-2)."""
    from measure.decoder import alibi_slopes

    torch.manual_seed(0)
    B, H, D, n = 2, 8, 16, 70_000
    slopes = alibi_slopes(H)
    cache = FullCache(B, H, n + 1, D, dtype, device, slopes)
    cache.fill_random(n)
    q, k, v = (torch.randn(B, H, 1, D, dtype=dtype, device=device) for _ in range(3))
    got = cache.decode(q, k, v, n).float().cpu()
    keys, values = cache.k[:, :, :, :D].float().cpu(), cache.v[:, :, :, :D].float().cpu()
    q = q.cpu()
    logits = (q.float() @ keys.transpose(-1, -2)) / D ** 0.5 + slopes[:, None, None] * (torch.arange(n + 1) - n)
    want = logits.softmax(-1) @ values
    assert (got - want).abs().max() <= tol * want.abs().max()
