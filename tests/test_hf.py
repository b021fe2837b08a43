"""measure.hf on the CPU: transformers models built from kfsim's workloads, KeyformerCache under generate(), and
the steady-state steps that kfsim measure --backend hf times."""
import dataclasses

import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

from kfsim.catalog import names  # noqa: E402
from kfsim.errors import KfsimError  # noqa: E402
from kfsim.workload import get_workload  # noqa: E402
from measure import hf  # noqa: E402
from measure.campaign import Point  # noqa: E402
from measure.hf_campaign import HfRunner, cached_tokens  # noqa: E402
from measure.kv_policies import EvictingCache  # noqa: E402

TINY = {  # small models of the families Keyformer's hook reaches
    "llama": tf.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "gptj": tf.GPTJConfig(vocab_size=97, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256,
                          bos_token_id=0, eos_token_id=0),
    "mpt": tf.MptConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, expansion_ratio=2, max_seq_len=256,
                        no_bias=True),
}


#: families whose generate() uses a cache (transformers 5.17 runs MPT's generate() without one: every step
#: recomputes the whole sequence), so MPT is checked with its forward calls
GENERATE = ("llama", "gptj")


def tiny(family):
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(TINY[family]).eval()


def generate(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0, attention_mask=torch.ones_like(ids), **kw)


@pytest.mark.parametrize("name", names("model"))
def test_models_built_from_workloads_have_kfsims_parameter_count(name):
    """The library's own class, built from the workload's shape, holds exactly the parameters kfsim counts."""
    w = get_workload(name)
    model = hf.build_model(w, w.max_context, device="meta")
    assert sum(p.numel() for p in model.parameters()) == w.n_params


@pytest.mark.parametrize("family", GENERATE)
def test_keyformer_at_kv_ratio_one_gives_the_full_caches_logits(family):
    model = tiny(family)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    full = generate(model, ids)
    hf.enable_keyformer(model)
    kf = generate(model, ids, past_key_values=hf.KeyformerCache(kv_ratio=1.0))
    again = generate(model, ids)  # the hook leaves other caches to the model's own attention
    for a, b, c in zip(full.logits, kf.logits, again.logits):
        assert torch.allclose(a, b, atol=1e-5) and torch.equal(a, c)
    assert torch.equal(full.sequences, kf.sequences)


@pytest.mark.parametrize("family", GENERATE)
def test_keyformer_cache_holds_the_budget_and_evicts_as_kv_policies(family, monkeypatch):
    """Each layer keeps kv_ratio x prompt tokens (+ the free slot); its evictions and scores are EvictingCache's
    on the same queries, keys and values, replayed into a fresh one (noise zeroed in both, to compare)."""
    monkeypatch.setattr("measure.kv_policies.gumbel_noise", torch.zeros_like)
    model = tiny(family)
    hf.enable_keyformer(model)
    cache = hf.KeyformerCache(kv_ratio=0.25, window=0.5)
    layer_cls = hf.KeyformerLayer
    real, seen = layer_cls.attend, []

    def spy(layer, query, scale):
        if layer is cache.layers[0]:
            seen.append((query, *layer.new_kv, scale, layer.seen))
        return real(layer, query, scale)

    monkeypatch.setattr(layer_cls, "attend", spy)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    generate(model, ids, past_key_values=cache)
    kept = cache.layers[0].evicting
    assert kept.budget == 4 and kept.k.shape[2] == 8  # 0.25 x 16 prompt tokens + the free slot, aligned to 8
    assert len(seen) == 6 and cache.get_seq_length() == 21  # the prompt, five steps; positions go on
    q, k, v, scale, _ = seen[0]
    ref = EvictingCache("keyformer", 2, k.shape[1], 4, 2, k.shape[-1], k.dtype, "cpu")
    ref.scale = scale
    ref.prefill(q, k, v)
    for q, k, v, scale, pos in seen[1:]:
        ref.decode(q, k, v, pos)
    assert torch.equal(ref.pos, kept.pos) and torch.equal(ref.free, kept.free)
    assert torch.allclose(ref.score, kept.score)
    assert (kept.pos >= 0).sum(dim=-1).eq(5).all()  # budget + the newest token


def test_mpt_keyformer_at_kv_ratio_one_gives_the_full_caches_logits():
    """MPT's hook applies ALiBi at the kept tokens' own positions: with every token kept, the full cache's logits;
    at a real budget, other logits (the check can fail)."""
    model = tiny("mpt")
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))

    def greedy(cache):
        x, out = ids, []
        with torch.no_grad():
            for _ in range(6):
                logits = model(x, past_key_values=cache, use_cache=True).logits[:, -1]
                out.append(logits)
                x = logits.argmax(-1, keepdim=True)
        return torch.stack(out)

    full = greedy(tf.DynamicCache(config=model.config))
    hf.enable_keyformer(model)
    assert torch.allclose(greedy(hf.KeyformerCache(kv_ratio=1.0)), full, atol=1e-5)
    assert not torch.allclose(greedy(hf.KeyformerCache(kv_ratio=0.25)), full, atol=1e-3)
    assert torch.equal(greedy(tf.DynamicCache(config=model.config)), full)  # other caches: the model's own path


def test_keyformer_cache_refuses_bad_settings():
    for kw, word in (({"kv_ratio": 0}, "kv_ratio 0 is out of range"), ({"kv_ratio": 1.5}, "kv_ratio 1.5"),
                     ({"window": 0}, "window 0"), ({"kind": "window"}, "kind 'window'")):
        with pytest.raises(KfsimError, match=word):
            hf.KeyformerCache(**kw)


def test_keyformer_hook_refuses_other_families():
    model = tf.AutoModelForCausalLM.from_config(tf.GPT2Config(vocab_size=97, n_embd=64, n_layer=1, n_head=4))
    with pytest.raises(KfsimError, match="no attention hook for gpt2"):
        hf.enable_keyformer(model)


def _runner(mode="eager"):
    return HfRunner.steps_only(mode)


def _tiny_workload(**kw):
    base = dict(name="tiny-llama", description="test", family="llama", n_layers=2, d_model=64, n_heads=4,
                n_kv_heads=2, head_dim=16, rotary_dim=16, ffn_dim=128, vocab_size=97, max_context=4096,
                ffn_type="swiglu", norm="rmsnorm",
                norm_bias=False, source={"architecture": "test"})
    return dataclasses.replace(get_workload("llama-3-8b"), **{**base, **kw})


def _tiny_model(policy: str, window: int | None):
    """A tiny Llama-style workload with `window` and its random-weight model, hooked for Keyformer unless full."""
    w = _tiny_workload(sliding_window=window)
    model = hf.build_model(w, 512, device="cpu")
    if policy != "full":
        hf.enable_keyformer(model)
    return w, model


@pytest.mark.parametrize("policy, ratio, window", [("full", 1.0, None), ("keyformer", 0.5, None),
                                                   ("full", 1.0, 48), ("keyformer", 0.5, 16)])
def test_steady_steps_keep_their_context(policy, ratio, window):
    """A timed step attends the same tokens every time: the dynamic cache is cut back after each step (a
    sliding window trims itself), Keyformer's holds its budget (capped at the window)."""
    w, model = _tiny_model(policy, window)
    pt = Point(w.name, "decode", 2, 100, ratio, policy)
    with torch.no_grad():
        step, cache, rewind = _runner().steady_step(model, w, pt, device="cpu")
        for _ in range(3):
            step()
            rewind()
    expect = 50 if policy != "full" else 100
    expect = min(expect, window) if window else expect
    assert cached_tokens(cache, w, pt) == expect
    if policy == "full" and not window:
        assert cache.get_seq_length() == 100
        # as contiguous as after a real step, so that the timed append copies what real decoding copies
        assert all(t.is_contiguous() for layer in cache.layers for t in (layer.keys, layer.values))
    if policy != "full":
        assert cache.layers[0].evicting.budget == expect and cache.get_seq_length() == 103


def test_static_cache_steps_rewind_to_their_context():
    """--hf-mode compiled's step (here without torch.compile): the static cache of context + 1 slots is written at
    slot `context` each step and rewound after it."""
    w = _tiny_workload()
    model = hf.build_model(w, 512, device="cpu")
    r = _runner("compiled")
    r.compiled = model.forward
    with torch.no_grad():
        step, cache, rewind = r.steady_step(model, w, Point(w.name, "decode", 2, 100, 1.0, "full"), device="cpu")
        for _ in range(3):
            logits = step().logits
            rewind()
    assert logits.shape == (2, 1, 97) and torch.isfinite(logits).all()
    assert [int(layer.cumulative_length) for layer in cache.layers] == [100, 100]
    assert cache.layers[0].keys.shape == (2, 2, 101, 16)


@pytest.mark.parametrize("family", ["llama", "gptj", "mpt"])
def test_compiled_keyformer_steps_are_one_graph_with_the_eager_logits(family):
    """--hf-mode compiled's Keyformer step: torch.compile traces it whole (fullgraph), compiles it once for every
    step (nothing on the host changes shape or size between steps), and gives the eager step's logits and
    evictions."""
    from torch._dynamo.backends.debugging import aot_eager
    from torch._dynamo.utils import counters

    extra = {"llama": {}, "gptj": dict(family="gptj", n_kv_heads=4, rotary_dim=8),
             "mpt": dict(family="mpt", n_kv_heads=4, position="alibi", rotary_dim=0)}[family]
    w = _tiny_workload(**extra)
    model = hf.build_model(w, 512, device="cpu")
    hf.enable_keyformer(model)
    pt = Point(w.name, "decode", 2, 100, 0.5, "keyformer")
    runs, inputs = {}, []

    def backend(gm, example_inputs):
        inputs.extend(n.name for n in gm.graph.nodes if n.op == "placeholder")
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    counters.clear()
    for mode in ("eager", "compiled"):
        r = _runner(mode)
        r.compiled = torch.compile(model.forward, backend=backend, fullgraph=True, dynamic=True)
        torch.manual_seed(1)
        with torch.no_grad():
            step, cache, rewind = r.steady_step(model, w, pt, device="cpu")
            for layer in cache.layers:
                layer.evicting.noise = torch.zeros_like  # Gumbel noise off: the same evictions both ways
            logits = []
            for _ in range(3):
                logits.append(step().logits)
                rewind()
        runs[mode] = logits, [layer.evicting.free.clone() for layer in cache.layers]
    assert counters["stats"]["unique_graphs"] == 1
    # GPT-J's sqrt(head_dim) is a CPU tensor: read in the graph, it cost the H100's compiled step 0.12 ms a layer
    # (lab/data/hf/h100-gptj-scale-graphs.csv)
    assert not [name for name in inputs if "scale_attn" in name]
    for eager, compiled in zip(runs["eager"][0], runs["compiled"][0]):
        assert torch.equal(eager, compiled)
    assert all(torch.equal(a, b) for a, b in zip(runs["eager"][1], runs["compiled"][1]))


@pytest.mark.parametrize("policy, ratio, window, kept", [("full", 1.0, None, 100), ("keyformer", 0.5, None, 50),
                                                         ("full", 1.0, 48, 48), ("keyformer", 0.5, 16, 16)])
def test_prefill_steps_fill_a_new_cache_each_time(policy, ratio, window, kept):
    """A timed prefill is a whole prompt into an empty cache, every time: the library's dynamic cache holds the
    prompt (its sliding window's last tokens), Keyformer's its budget of it (capped at the window)."""
    w, model = _tiny_model(policy, window)
    pt = Point(w.name, "prefill", 2, 100, ratio, policy)
    with torch.no_grad():
        step, made = _runner().prefill_step(model, w, pt, device="cpu")
        first = step()
        caches = [made[-1], step() and made[-1]]
    assert first.logits.shape == (2, 1, 97) and torch.isfinite(first.logits).all()
    assert caches[0] is not caches[1] and cached_tokens(caches[1], w, pt) == kept
    assert caches[1].get_seq_length() == 100


def test_runner_says_what_transformers_cannot_measure():
    r = _runner()
    assert r._supported(Point("gpt-j-6b", "prefill", 1, 512, 1.0, "full")) is None
    assert "--hf-mode eager" in _runner("compiled")._supported(Point("gpt-j-6b", "prefill", 1, 512, 1.0, "full"))
    assert "gpt2 model" in r._supported(Point("cerebras-gpt-111m", "decode", 1, 512, 0.5, "keyformer"))
    assert r._supported(Point("mpt-7b", "decode", 1, 512, 0.5, "keyformer")) is None
    assert r._supported(Point("mpt-7b", "decode", 1, 512, 1.0, "full")) is None
    assert r._supported(Point("llama-3-8b", "decode", 1, 512, 0.5, "keyformer")) is None
    assert _runner("compiled")._supported(Point("llama-3-8b", "decode", 1, 512, 0.5, "keyformer")) is None
    assert "kv-ratio 1" in _runner("compiled")._supported(Point("llama-3-8b", "decode", 1, 512, 1.0, "keyformer"))
    assert "positions" in r._supported(Point("llama-3-8b", "decode", 1, 40000, 1.0, "full"))
    assert "sliding window" in _runner("compiled")._supported(Point("mistral-7b", "decode", 1, 4096, 1.0, "full"))
    assert _runner("compiled")._supported(Point("mistral-7b", "decode", 1, 1024, 1.0, "full")) is None
    # KeyformerCache keeps at most the window itself (max_budget), so no static sliding cache rolls
    assert _runner("compiled")._supported(Point("mistral-7b", "decode", 16, 16384, 0.2, "keyformer")) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", GENERATE)
def test_keyformer_generate_on_the_gpu(family):
    model = tiny(family).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 97, (4, 64), device="cuda")
    hf.enable_keyformer(model)
    out = generate(model, ids, past_key_values=hf.KeyformerCache(kv_ratio=0.5))
    full = generate(model, ids, past_key_values=hf.KeyformerCache(kv_ratio=1.0))
    plain = generate(model, ids)
    assert out.sequences.shape == (4, 70)
    assert torch.allclose(full.logits[0].float(), plain.logits[0].float(), atol=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", GENERATE)
def test_compiled_keyformer_steps_replay_a_cuda_graph(family):
    """Under torch.compile(mode="reduce-overhead") the Keyformer step is captured in a CUDA graph (its cache's
    tensors are marked static, so updating them in place does not make torch skip the graph) and still evicts as
    the eager step does; GPT-J's through its own `_attn` hook as Llama's through the attention interface."""
    from torch._dynamo.utils import counters

    w = _tiny_workload() if family == "llama" else _tiny_workload(family="gptj", n_kv_heads=4)
    model = hf.build_model(w, 512)
    hf.enable_keyformer(model)
    pt = Point(w.name, "decode", 2, 100, 0.5, "keyformer")
    torch._dynamo.reset()
    counters.clear()
    frees = {}
    for mode in ("eager", "compiled"):
        r = _runner(mode)
        r.compiled = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True, dynamic=True)
        torch.manual_seed(1)
        with torch.inference_mode():
            step, cache, rewind = r.steady_step(model, w, pt)
            for layer in cache.layers:
                layer.evicting.noise = torch.zeros_like
            for _ in range(6):
                step()
                rewind()
        frees[mode] = [layer.evicting.free.clone() for layer in cache.layers]
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert counters["stats"]["unique_graphs"] == 1
    assert all(torch.equal(a, b) for a, b in zip(frees["eager"], frees["compiled"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("alibi", [False, True])
def test_keyformer_decode_steps_never_wait_for_the_gpu(alibi):
    """A Keyformer layer's decode step queues its kernels without waiting for the GPU (no host-to-device copy of
    its position or slopes, no .item()): a wait per layer would make an eager step the sum of the host's and the
    GPU's time instead of the longer."""
    from measure.decoder import alibi_slopes

    layer = hf.KeyformerLayer(kv_ratio=0.5, window=0.3, kind="keyformer", max_budget=None)
    B, H, Hkv, D = 2, 8, 4, 16
    slopes = alibi_slopes(H, 8.0).cuda() if alibi else None
    qkv = lambda T: [torch.randn(B, h, T, D, device="cuda", dtype=torch.bfloat16) for h in (H, Hkv, Hkv)]  # noqa: E731
    q, k, v = qkv(32)
    layer.update(k, v)
    layer.attend(q, D ** -0.5, alibi=slopes)  # the prompt
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            q, k, v = qkv(1)
            layer.update(k, v)
            layer.attend(q, D ** -0.5, alibi=slopes)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert layer.seen == 35 and int(layer.position) == 35


@pytest.mark.parametrize("family", ["llama", "gptj", "mpt"])
@pytest.mark.parametrize("policy", ["full", "keyformer"])
def test_profiler_ranges_find_each_group_in_transformers_models(family, policy):
    """--profile --backend hf: the groups are found by module names in transformers' own classes (GPT-J and MPT
    compute positions inside attention, or in a rotary module of the model from transformers 5.2x, which is what a
    positional group needs); CPU op times."""
    from kfsim.breakdown import GROUPS
    from measure.profile import profile_step

    model = tiny(family).to(torch.bfloat16)  # the steady step's cache is bf16
    if policy != "full":
        hf.enable_keyformer(model)
    w = {"llama": _tiny_workload(), "gptj": _tiny_workload(family="gptj", n_kv_heads=4),
         "mpt": _tiny_workload(family="mpt", n_kv_heads=4, position="alibi")}[family]
    pt = Point(w.name, "decode", 2, 48, 0.5 if policy != "full" else 1.0, policy)
    with torch.inference_mode():
        step, _, rewind = _runner().steady_step(model, w, pt, device="cpu")
        g = profile_step(model, step, steps=2, warmup=1, after=rewind)["groups"]
    assert set(g) == set(GROUPS) and all(v >= 0 for v in g.values())
    assert all(g[k] > 0 for k in ("projections", "attention", "ffn", "norms", "lm_head"))
    rotary_module = any(name.endswith("rotary_emb") for name, _ in model.named_modules())
    assert (g["positional"] > 0) == rotary_module and (rotary_module or family != "llama")
    assert (g["keyformer"] > 0) == (policy == "keyformer")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("model", ["llama-3-8b", "gpt-j-6b", "mpt-7b"])
def test_host_ops_per_layer_and_per_step_add_up_to_a_whole_step(model):
    """measure.host_ops: the per-layer and per-step counts (from tiny models of 1 and 3 layers) give the count of
    a 2-layer model's step; a Keyformer cache dispatches more per layer, and views launch nothing (but are
    dispatched)."""
    from measure import host_ops

    layer, step = host_ops.per_step(model, "full")
    w = host_ops.tiny(get_workload(model), 2)
    built = hf.build_model(w, 256, device="cpu")
    with torch.inference_mode():
        run, _, rewind = _runner().steady_step(built, w, Point(model, "decode", 2, 64, 1.0, "full"), device="cpu")
        run()
        rewind()
        assert host_ops.count(run) == step + 2 * layer
    assert layer > 0 and host_ops.per_step(model, "keyformer")[0] > layer
    x = torch.ones(4, 4)
    assert host_ops.count(lambda: x.view(2, 8).t()) == 0
    assert host_ops.count(lambda: x + 1) == 1
    # every dispatched op, views included: each costs the host a dispatch
    assert host_ops.count(lambda: x.view(2, 8).t(), every=True) == 2
    assert host_ops.per_step(model, "full", every=True)[0] > layer


def test_a_model_torch_compile_refuses_is_recorded_and_skipped(monkeypatch):
    """A compile failure (transformers 5.17's MPT under dynamic shapes) is the model's, not the point's: an
    `unsupported` row naming torch.compile, and the model's later points are not compiled again."""
    from measure.campaign import Runner

    calls = []

    def refuse(self, pt, power=True):
        calls.append(pt)
        raise torch._dynamo.exc.InternalTorchDynamoError("PendingUnbackedSymbolNotFound: u2\nmore")

    monkeypatch.setattr(Runner, "measure", refuse)
    r = _runner("compiled")
    monkeypatch.setattr(r, "row_head", lambda pt: {"model": pt.model, "batch": pt.batch})
    rows = [r.measure(Point("mpt-7b", "decode", b, 1024, 1.0, "full")) for b in (1, 16)]
    assert [row["status"] for row in rows] == ["unsupported", "unsupported"]
    assert "torch.compile" in rows[1]["error"] and "PendingUnbackedSymbolNotFound" in rows[1]["error"]
    assert len(calls) == 1
    assert r._supported(Point("llama-3-8b", "decode", 1, 1024, 1.0, "full")) is None
    assert r._supported(Point("mpt-7b", "decode", 1, 1024, 0.5, "keyformer")) is None  # Keyformer's own attention


def test_a_reshape_that_copies_is_a_kernel_and_one_that_views_is_not():
    """transformers' repeat_kv reshapes an expanded tensor (a copy per query head): counted; a reshape or a
    contiguous() that returns a view of its input launches nothing."""
    from measure import host_ops

    kv = torch.ones(2, 2, 8, 4)
    expanded = kv[:, :, None].expand(2, 2, 4, 8, 4)
    assert host_ops.count(lambda: expanded.reshape(2, 8, 8, 4)) == 1
    assert host_ops.count(lambda: kv.reshape(4, 8, 4)) == 0
    assert host_ops.count(lambda: kv.contiguous()) == 0
    assert host_ops.count(lambda: kv.transpose(1, 2).contiguous()) == 1


@pytest.mark.parametrize("model,batch,window,streamed,strided", [
    # the cache read and written again by the append (2), read once by SDPA's grouped-head path (1)
    ("llama-3-8b", 2, False, 3.0, 0.0),
    # MPT's new key is a view of its fused QKV output at batch > 1: the append (2) is a strided concatenation;
    # its two matmuls read K and V once (1) and a bit of fp32 scores; at batch 1 the view is contiguous
    ("mpt-7b", 2, False, 1.1, 2.0),
    ("mpt-7b", 1, False, 3.1, 0.0),
    # past Mistral's window: the append from the window's strided view (2); a mask, so repeat_kv expands the 8
    # KV heads to 32 (reads the expanded view, 4, writes it, 4) and SDPA reads the copies (4)
    ("mistral-7b", 2, True, 12.0, 2.0),
])
def test_kv_passes_match_a_hand_count(model, batch, window, streamed, strided):
    from measure import kv_passes

    got = kv_passes.passes(model, batch, window=window)
    assert got[0] == pytest.approx(streamed, abs=0.06) and got[1] == pytest.approx(strided, abs=1e-9)


@pytest.mark.parametrize("policy,scorer", [
    # per kept token of a 2-KV-head tiny Llama (8 query heads of 128; K and V 1,024 bytes a token): the scorer reads
    # the 8 query heads' fp32 probabilities (32) to sum them per KV head (8 written), adds that to the score (8 + 8
    # + 8), compares the int64 positions (2 x 8 bytes) twice to make the recent-window mask (16 + 2, 16 + 2, and
    # 2 + 2 + 2 for the or), masks the rank twice (8 + 2 + 8, with the empty-slot compare 16 + 2) and reads it for
    # the arg-min (8): 168 bytes
    ("h2o", 168 / 1024),
    # Keyformer adds Gumbel noise first: drawn (32 written), clamped, two logs and two negations (5 x 64), added to
    # the logits (96), divided by tau (64), softmaxed (64): 576 more
    ("keyformer", (168 + 576) / 1024),
])
def test_scored_kv_passes_match_a_hand_count(policy, scorer):
    """measure.kv_passes on KeyformerCache: its attention reads K (512 bytes a token), writes bf16 logits (16),
    casts them to fp32 (16 + 32), scales (32 + 32), masks empty slots (32 + 2 + 32, the mask from the int64
    positions 16 + 2), softmaxes (32 + 32), casts back (32 + 16) and reads V (16 + 512): 1,364 bytes."""
    from measure import kv_passes

    streamed, strided, counted = kv_passes.passes("llama-3-8b", 2, policy=policy)
    assert streamed == pytest.approx(1364 / 1024) and strided == 0.0 and counted == pytest.approx(scorer)


@pytest.mark.parametrize("model,tensor,fp32,score_bytes", [
    # SDPA with is_causal and no mask: the masked half skipped (2 x (128 + 128) / 2 FLOPs a score), no score written
    ("llama-3-8b", 256.0, 0.0, 0.0),
    # GPT-J casts queries and keys to fp32 for their product (2 x 256 fp32 FLOPs), then per head and score: writes
    # the fp32 product (4), divides it by sqrt(d) (4 + 4), adds the mask (4 + 4), softmaxes (4 + 4), casts to bf16
    # (4 + 2) and reads it into the product with V (2; 2 x 256 16-bit FLOPs): 40 bytes; the causal mask, one per
    # sequence that every head shares, adds a little over its 16 heads
    ("gpt-j-6b", 512.0, 512.0, pytest.approx(40.0, abs=1.0)),
])
def test_prefill_counts_match_a_hand_count(model, tensor, fp32, score_bytes):
    from measure import prefill_counts

    got = prefill_counts.per_score(model)
    assert got == {"tensor_flops": tensor, "fp32_flops": fp32, "score_bytes": score_bytes}
    assert got["score_bytes"] >= (40.0 if fp32 else 0.0)
