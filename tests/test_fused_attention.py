"""The fused Triton kernels against the plain torch path: same attention output, scores and evictions.

On a CUDA GPU the compiled kernels run; without one, Triton's interpreter runs them on the CPU (slow, small sizes).
"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from measure.decoder import alibi_bias, alibi_slopes  # noqa: E402
from measure.fused_attention import (FEW_ROWS_PER_SM, PROGRAMS_PER_SM, FusedFullCache,  # noqa: E402
                                     FusedKeyformerCache, split_length)
from measure.kv_policies import EvictingCache, FullCache  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def cases():
    # (batch, kv heads, query heads per KV head, head dim, budget, split tokens)
    # split None: the adaptive split (a few splits on the CPU interpreter, one per SM share on a GPU)
    # split >= slots: one split per row, finished inside the split kernel (no combine / finish launch)
    # split 256 of blocks of 64 tokens: four blocks per split, so that the loop's running values carry over blocks
    small = [(2, 2, 1, 16, 40, 16), (1, 2, 4, 32, 70, 32), (1, 2, 1, 16, 150, None), (1, 1, 4, 16, 150, None),
             (2, 2, 1, 16, 40, 64), (2, 2, 4, 16, 40, 64), (1, 2, 4, 16, 300, 256)]
    big = [(2, 16, 1, 256, 1000, 256), (4, 8, 4, 128, 3000, 512), (1, 8, 4, 128, 8192, 512),
           (1, 16, 1, 256, 819, None), (1, 8, 4, 128, 3277, None), (16, 8, 4, 128, 2048, None),
           (64, 16, 1, 256, 205, None), (64, 8, 4, 128, 820, None)]
    return small + (big if DEVICE == "cuda" else [])


# finish chunks of 8 slots cut across the splits; offsets64: K and V addressed in 64 bits (as past 2^31 elements)
@pytest.mark.parametrize("kernel", [{}, {"offsets64": True}, {"finish_chunk": 8}],
                         ids=["default", "offsets64", "short-chunks"])
@pytest.mark.parametrize("B, HKV, G, D, budget, split", cases())
def test_keyformer_step_matches_plain(B, HKV, G, D, budget, split, kernel):
    torch.manual_seed(0)
    dtype = torch.float32
    plain = EvictingCache("keyformer", B, HKV, budget, max(1, budget // 4), D, dtype, DEVICE, tau_delta=0.05)
    plain.fill_random(budget * 2)
    plain.score.uniform_()
    twin = EvictingCache("keyformer", B, HKV, budget, max(1, budget // 4), D, dtype, DEVICE, tau_delta=0.05)
    for name in ("k", "v", "pos", "score", "free", "step"):
        getattr(twin, name).copy_(getattr(plain, name))
    fused = FusedKeyformerCache(twin, split_tokens=split, kernel=kernel)
    assert twin.pos.dtype == torch.int32
    S = plain.slots
    t = budget * 2
    for _ in range(3):
        q = torch.randn(B, HKV * G, 1, D, device=DEVICE, dtype=dtype)
        k, v = torch.randn(B, HKV, 1, D, device=DEVICE, dtype=dtype), torch.randn(B, HKV, 1, D, device=DEVICE,
                                                                                  dtype=dtype)
        noise = -torch.log(-torch.log(torch.rand(B, HKV, G, S, device=DEVICE).clamp(1e-10, 1 - 1e-7)))
        plain.noise = lambda like, n=noise: n
        fused.noise_tensor = noise.contiguous().view(-1)
        a = plain.decode(q, k, v, t)
        b = fused.decode(q, k, v, t)
        fused.sync()
        assert torch.allclose(a, b, atol=2e-4, rtol=2e-4)
        assert torch.allclose(plain.score, twin.score, atol=1e-4, rtol=1e-4)
        assert torch.equal(plain.free, twin.free)
        assert torch.equal(plain.pos, twin.pos.long())
        assert torch.equal(plain.k, twin.k) and torch.equal(plain.v, twin.v)
        assert float(plain.step) == float(twin.step)
        t += 1


@pytest.mark.parametrize("kernel", [{}, {"offsets64": True}], ids=["default", "offsets64"])
@pytest.mark.parametrize("B, HKV, G, D, budget, split", cases())
def test_full_cache_matches_sdpa(B, HKV, G, D, budget, split, kernel):
    torch.manual_seed(1)
    dtype = torch.float32
    plain = FullCache(B, HKV, budget + 1, D, dtype, DEVICE)
    plain.fill_random(budget)
    twin = FullCache(B, HKV, budget + 1, D, dtype, DEVICE)
    twin.k.copy_(plain.k), twin.v.copy_(plain.v)
    twin.length, twin.steady = plain.length, True
    fused = FusedFullCache(twin, split_tokens=split, kernel=kernel)
    q = torch.randn(B, HKV * G, 1, D, device=DEVICE, dtype=dtype)
    k, v = torch.randn(B, HKV, 1, D, device=DEVICE, dtype=dtype), torch.randn(B, HKV, 1, D, device=DEVICE,
                                                                              dtype=dtype)
    want = plain.decode(q, k, v, budget)
    assert torch.allclose(want, fused.decode(q, k, v, budget), atol=2e-4, rtol=2e-4)
    # again (the same slot, the same token): a step leaves nothing behind that changes the next
    assert torch.allclose(want, fused.decode(q, k, v, budget), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("split", [16, None])
def test_alibi_full_cache_matches_the_plain_cache(G, split):
    """An ALiBi model's full cache: the kernel's slope x (key - query position) gives the plain cache's output
    (SDPA with a per-head row of biases)."""
    torch.manual_seed(6)
    B, HKV, D, n = 2, 2, 16, 150
    H = HKV * G
    slopes = alibi_slopes(H)
    plain = FullCache(B, HKV, n + 1, D, torch.float32, DEVICE, alibi_slopes=slopes)
    plain.fill_random(n)
    twin = FullCache(B, HKV, n + 1, D, torch.float32, DEVICE)
    twin.k.copy_(plain.k), twin.v.copy_(plain.v)
    twin.length, twin.steady = plain.length, True
    fused = FusedFullCache(twin, split_tokens=split, slopes=slopes)
    q = torch.randn(B, H, 1, D, device=DEVICE)
    k, v = torch.randn(B, HKV, 1, D, device=DEVICE), torch.randn(B, HKV, 1, D, device=DEVICE)
    bias_fn = lambda kp, qp: alibi_bias(slopes.to(DEVICE), kp, qp, G)  # noqa: E731
    want = plain.decode(q, k, v, n, bias_fn)
    got = fused.decode(q, k, v, n, bias_fn)
    assert torch.allclose(want, got, atol=2e-4, rtol=2e-4), (want - got).abs().max()
    # and not the unbiased attention (the bias matters at these slopes)
    assert not torch.allclose(FusedFullCache(twin, split_tokens=split).decode(q, k, v, n), want, atol=1e-2)
    with pytest.raises(ValueError, match="needs its slopes"):
        FusedFullCache(twin, split_tokens=split).decode(q, k, v, n, bias_fn)


@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("split", [16, None])
def test_alibi_keyformer_scores_the_biased_logits(G, split):
    """Keyformer on an ALiBi model: output, scores and evictions of the plain cache, whose logits and Gumbel scores
    take the bias at each kept token's own position."""
    torch.manual_seed(7)
    B, HKV, D, budget = 2, 2, 16, 100
    H = HKV * G
    slopes = alibi_slopes(H).to(DEVICE)
    bias_fn = lambda kp, qp: alibi_bias(slopes, kp, qp, G)  # noqa: E731
    plain = EvictingCache("keyformer", B, HKV, budget, 25, D, torch.float32, DEVICE, tau_delta=0.05)
    plain.fill_random(3 * budget)
    twin = EvictingCache("keyformer", B, HKV, budget, 25, D, torch.float32, DEVICE, tau_delta=0.05)
    for name in ("k", "v", "pos", "score", "free", "step"):
        getattr(twin, name).copy_(getattr(plain, name))
    fused = FusedKeyformerCache(twin, split_tokens=split, slopes=slopes)
    t = 3 * budget
    for _ in range(3):
        q = torch.randn(B, H, 1, D, device=DEVICE)
        k, v = torch.randn(B, HKV, 1, D, device=DEVICE), torch.randn(B, HKV, 1, D, device=DEVICE)
        noise = -torch.log(-torch.log(torch.rand(B, HKV, G, plain.slots, device=DEVICE).clamp(1e-10, 1 - 1e-7)))
        plain.noise = lambda like, n=noise: n
        fused.noise_tensor = noise.contiguous().view(-1)
        a, b = plain.decode(q, k, v, t, bias_fn), fused.decode(q, k, v, t, bias_fn)
        fused.sync()
        assert torch.allclose(a, b, atol=2e-4, rtol=2e-4)
        assert torch.allclose(plain.score, twin.score, atol=1e-4, rtol=1e-4)
        assert torch.equal(plain.free, twin.free) and torch.equal(plain.pos, twin.pos.long())
        t += 1


@pytest.mark.parametrize("interleaved, rot_dim, G", [(True, 8, 1), (False, 16, 4)])
@pytest.mark.parametrize("policy", ["full", "keyformer"])
def test_rotary_in_the_kernel_equals_rotating_first(interleaved, rot_dim, G, policy):
    """q and k before rotary plus (cos, sin): the kernel rotates them (GPT-J's interleaved pairs on part of each
    head, Llama's halves) and gives the output and cache of the unfused path on rotated inputs."""
    from measure.decoder import Rotary

    torch.manual_seed(2)
    B, HKV, D, budget, pos = 1, 2, 16, 40, 57
    rot = Rotary(rot_dim, 10000.0, 128, interleaved).to(DEVICE)
    cos, sin = rot.cos[pos].contiguous(), rot.sin[pos].contiguous()
    twins = []
    for _ in range(2):
        if policy == "full":
            c = FullCache(B, HKV, budget + 1, D, torch.float32, DEVICE)
            c.fill_random(budget)
            twins.append(c)
        else:
            c = EvictingCache("keyformer", B, HKV, budget, budget // 4, D, torch.float32, DEVICE)
            c.fill_random(budget * 2)
            twins.append(c)
    twins[1].k.copy_(twins[0].k), twins[1].v.copy_(twins[0].v)
    if policy == "full":
        for c in twins:
            c.steady = True
        a, b = FusedFullCache(twins[0], split_tokens=16), FusedFullCache(twins[1], split_tokens=16)
    else:
        for name in ("pos", "score", "free", "step"):
            getattr(twins[1], name).copy_(getattr(twins[0], name))
        a = FusedKeyformerCache(twins[0], split_tokens=16)
        b = FusedKeyformerCache(twins[1], split_tokens=16)
        noise = torch.zeros(B * HKV * G * twins[0].slots, device=DEVICE)
        a.noise_tensor = b.noise_tensor = noise
    q = torch.randn(B, HKV * G, 1, D, device=DEVICE)
    k, v = torch.randn(B, HKV, 1, D, device=DEVICE), torch.randn(B, HKV, 1, D, device=DEVICE)
    positions = torch.tensor([pos], device=DEVICE)
    want = a.decode(rot(q, positions), rot(k, positions), v, pos)
    got = b.decode(q, k, v, pos, rotary=(cos, sin, rot_dim, interleaved))
    assert torch.allclose(want, got, atol=2e-5, rtol=2e-5)
    assert torch.allclose(twins[0].k, twins[1].k, atol=2e-6) and torch.equal(twins[0].v, twins[1].v)


@pytest.mark.parametrize("policy", ["full", "keyformer"])
def test_q_k_v_as_column_slices_of_one_projection(policy):
    """A batch's stacked projections [B, q | k | v | ...] handed over as column views (rows further apart than
    their width), as the compiled decoder does: the same output, scores and writes as contiguous copies."""
    torch.manual_seed(4)
    B, HKV, G, D, budget = 3, 2, 2, 16, 40
    H = HKV * G
    dtype = torch.float32
    qkv = torch.randn(B, (H + 2 * HKV) * D + 24, device=DEVICE, dtype=dtype)  # 24 columns of something else
    q, k, v = (t.view(B, -1, 1, D) for t in qkv[:, : (H + 2 * HKV) * D].split([H * D, HKV * D, HKV * D], dim=1))
    assert not q.is_contiguous()
    runs = []
    for args in ((q, k, v), (q.contiguous(), k.contiguous(), v.contiguous())):
        if policy == "full":
            plain = FullCache(B, HKV, budget + 1, D, dtype, DEVICE)
            plain.fill_random(budget)
            torch.manual_seed(5)
            plain.k.normal_(), plain.v.normal_()
            cache = FusedFullCache(plain, split_tokens=16)
        else:
            plain = EvictingCache("keyformer", B, HKV, budget, 10, D, dtype, DEVICE)
            plain.fill_random(2 * budget)
            torch.manual_seed(5)
            plain.k.normal_(), plain.v.normal_(), plain.score.uniform_()
            cache = FusedKeyformerCache(plain, split_tokens=16)
            cache.noise_tensor = torch.zeros(B * H * plain.slots, device=DEVICE)
        runs.append((cache.decode(*args, 2 * budget), plain))
    (a, pa), (b, pb) = runs
    assert torch.allclose(a, b, atol=1e-5) and torch.equal(pa.k, pb.k) and torch.equal(pa.v, pb.v)
    if policy == "keyformer":
        assert torch.allclose(pa.score, pb.score, atol=1e-6)


def test_q_with_heads_apart_is_refused():
    from measure.fused_attention import FusedDecoder

    f = FusedDecoder(1, 2, 2, 32, 16, DEVICE, scoring=False)
    q = torch.randn(1, 16, 2, device=DEVICE).transpose(1, 2)  # [1, 2, 16] with heads 1 element apart
    kv = torch.randn(1, 2, 16, device=DEVICE)
    cache = torch.zeros(1, 2, 32, 16, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous heads"):
        f.attend(q, kv, kv, cache, cache, 10)


def test_the_layers_share_one_z_buffer():
    """The layers of a step share z (it lives for one layer's step), so it can stay in L2 from layer to layer."""
    from measure.fused_attention import StepState

    state = StepState(DEVICE)
    layers = []
    for i in range(2):
        c = EvictingCache("keyformer", 1, 2, 40, 10, 16, torch.float32, DEVICE)
        c.fill_random(80)
        layers.append(FusedKeyformerCache(c, state=state, first=i == 0, last=i == 1))
    q, k = torch.randn(1, 2, 1, 16, device=DEVICE), torch.randn(1, 2, 1, 16, device=DEVICE)
    for layer in layers:
        layer.decode(q, k, k, 80)
    assert layers[0].fused.z.data_ptr() == layers[1].fused.z.data_ptr()


def test_split_length_hand_counts():
    # GPT-J-6B at batch 1 on an H200 (132 SMs): 16 rows < 132, so about 2 programs per SM -> 17 splits; 520 slots
    # = 17 blocks of 32 -> one block per split
    assert split_length(520, 16, 32, 132) == 32
    # ... at 8k tokens, 257 blocks -> 16 per split (17 splits)
    assert split_length(8193, 16, 32, 132) == 512
    # Llama-3-8B, 8 KV heads, 16k context: 33 splits; 257 blocks of 64 -> 8 per split
    assert split_length(16392, 8, 64, 132) == 512
    # batch 16 x 16 KV heads (256 rows): about 4 programs per SM -> 3 splits; 257 blocks -> 86 per split
    assert split_length(8193, 256, 32, 132) == 86 * 32
    # batch 64 x 16 heads already fills the GPU: one split holds everything
    assert split_length(4104, 1024, 32, 132) == 4128
    # an explicit length is rounded up to whole blocks
    assert split_length(5000, 1, 64, 132, split_tokens=100) == 128


@settings(max_examples=200, deadline=None)
@given(slots=st.integers(1, 200_000), rows=st.integers(1, 2048), block=st.sampled_from([16, 32, 64]),
       sms=st.integers(1, 160))
def test_splits_are_whole_blocks_and_fill_the_gpu_about_as_asked(slots, rows, block, sms):
    """Whole blocks, every slot covered, and no more splits than the programs per SM ask for."""
    length = split_length(slots, rows, block, sms)
    nsplit = -(-slots // length)
    assert length % block == 0 and nsplit * length >= slots
    per_sm = FEW_ROWS_PER_SM if rows < sms else PROGRAMS_PER_SM
    assert nsplit <= -(-per_sm * sms // rows)


# fast_log takes the logs with PTX (lg2.approx), which Triton's CPU interpreter cannot run
@pytest.mark.parametrize("fast_log", [False, pytest.param(True, marks=pytest.mark.skipif(
    DEVICE != "cuda", reason="fast_log is PTX: GPU only"))], ids=["exact-log", "fast-log"])
def test_in_kernel_noise_is_standard_gumbel(fast_log):
    from measure.fused_attention import kernel_noise

    n = 1 << 15
    a = kernel_noise(n, 3, DEVICE, fast_log).double()
    b = kernel_noise(n, 4, DEVICE, fast_log).double()
    if fast_log:  # the same draws as the exact logs give, up to the approximation
        exact = kernel_noise(n, 3, DEVICE).double()
        assert torch.isfinite(a).all()
        # below 6 (-ln u > 2.5e-3) the approximate log2's error stays relative; above it (u within 2.5e-3 of 1,
        # where lg2.approx's error may be absolute) only a rare large draw can move, and not far
        body = exact < 6
        assert torch.allclose(a[body], exact[body], atol=1e-3, rtol=1e-4)
        assert (a - exact).abs().max().item() < 0.5
    # Gumbel(0, 1): mean = Euler-Mascheroni 0.5772, variance pi^2 / 6 = 1.645; 32k draws -> standard errors ~0.007
    assert abs(a.mean().item() - 0.5772) < 0.04 and abs(a.var().item() - 1.6449) < 0.08
    # P(X <= 0) = exp(-1) = 0.368
    assert abs((a <= 0).double().mean().item() - 0.3679) < 0.015
    # another step gives other noise for the same elements, uncorrelated with the first
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.03
    assert abs(torch.corrcoef(torch.stack([a[:-1], a[1:]]))[0, 1].item()) < 0.03


def test_k_and_v_past_32_bit_offsets_switch_to_64_bit_and_z_past_them_is_refused():
    """GPT-J-6B at batch 64 x 8200 slots read out of bounds on the H200 with int32 offsets: such a K and V are now
    addressed in 64 bits (other shapes keep the measured 32-bit kernel); z and the scores must stay below 2^31."""
    from kfsim.errors import KfsimError
    from measure.fused_attention import INT32_MAX, FusedDecoder

    assert 64 * 16 * 8200 * 256 > INT32_MAX >= 64 * 8 * 16392 * 128  # Llama-3-8B's largest grid cache fits
    assert FusedDecoder(64, 16, 16, 205, 256, DEVICE, scoring=False).offsets64 is False
    if DEVICE == "cuda":  # the buffers of a decoder this big are small, but the CPU interpreter need not make them
        assert FusedDecoder(64, 16, 16, 8200, 256, DEVICE, scoring=False).offsets64 is True
    with pytest.raises(KfsimError, match="32-bit offsets: batch 4096 x 64 heads x 8200 slots"):
        FusedDecoder(4096, 64, 8, 8200, 128, DEVICE)


@pytest.mark.skipif(DEVICE != "cuda", reason="a cache of 2^31 elements per layer: GPU only")
@pytest.mark.parametrize("policy", ["full", "keyformer"])
def test_a_cache_past_32_bit_offsets_matches_plain(policy):
    """GPT-J-6B's shape at batch 64 x 8200 slots (4.3 GB of K per layer), bf16: the rows past 2^31 elements are
    read and written where the plain path reads and writes them."""
    torch.manual_seed(2)
    B, HKV, D, S = 64, 16, 256, 8200
    dt = torch.bfloat16
    q = torch.randn(B, HKV, 1, D, device=DEVICE, dtype=dt)
    k, v = torch.randn(B, HKV, 1, D, device=DEVICE, dtype=dt), torch.randn(B, HKV, 1, D, device=DEVICE, dtype=dt)
    if policy == "full":
        plain = FullCache(B, HKV, S, D, dt, DEVICE)
        plain.fill_random(S - 1)
        want = plain.decode(q, k, v, S - 1)
        plain.length = S - 1  # the same step again, on the same cache, by the fused kernel
        got = FusedFullCache(plain, kernel={}).decode(q, k, v, S - 1)
        assert torch.allclose(want.float(), got.float(), atol=2e-2, rtol=2e-2)
        return
    plain = EvictingCache("keyformer", B, HKV, S - 1, 64, D, dt, DEVICE)
    plain.fill_random(2 * S)
    twin = EvictingCache("keyformer", B, HKV, S - 1, 64, D, dt, DEVICE)
    for name in ("k", "v", "pos", "score", "free", "step"):
        getattr(twin, name).copy_(getattr(plain, name))
    twin.free.fill_(S - 5)  # write the new token past 2^31 elements for the last sequences
    plain.free.fill_(S - 5)
    fused = FusedKeyformerCache(twin)
    noise = -torch.log(-torch.log(torch.rand(B, HKV, 1, S, device=DEVICE).clamp(1e-10, 1 - 1e-7)))
    plain.noise = lambda like: noise
    fused.noise_tensor = noise.contiguous().view(-1)
    want, got = plain.decode(q, k, v, 2 * S), fused.decode(q, k, v, 2 * S)
    fused.sync()
    assert torch.allclose(want.float(), got.float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(plain.k[-1, :, S - 5], twin.k[-1, :, S - 5]) and torch.equal(plain.v[-1], twin.v[-1])
    assert torch.allclose(plain.score, twin.score, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("policy", ["full", "keyformer"])
def test_alibi_prompt_through_fused_caches_is_biased(policy):
    """An ALiBi model's prompt through fused caches (their plain caches hold no slopes, the kernel adds the bias
    only at decode) gives the plain caches' logits: the decoder hands them its float bias."""
    import dataclasses

    from kfsim.workload import get_workload
    from measure.compiled import fuse_caches
    from measure.decoder import build, slopes_of

    w = dataclasses.replace(get_workload("mpt-7b"), n_layers=2, d_model=64, n_heads=4, n_kv_heads=4, head_dim=16,
                            ffn_dim=96, vocab_size=101, max_context=128)
    torch.manual_seed(0)
    model = build(w, dtype=torch.float32, device=DEVICE)
    prompt = torch.randint(0, w.vocab_size, (2, 30), device=DEVICE)

    def caches(slopes):
        if policy == "full":
            return [FullCache(2, 4, 48, 16, torch.float32, DEVICE, alibi_slopes=slopes) for _ in range(2)]
        return [EvictingCache("keyformer", 2, 4, 40, 10, 16, torch.float32, DEVICE) for _ in range(2)]

    with torch.no_grad():
        want = model.prefill(prompt, caches(slopes_of(w)))
        got = model.prefill(prompt, fuse_caches(caches(None), slopes=slopes_of(w)))
    assert torch.allclose(want, got, atol=1e-5), (want - got).abs().max()


@pytest.mark.parametrize("name", ["gpt-j-6b", "llama-3-8b", "mpt-7b", "cerebras-gpt-6.7b"])
@pytest.mark.parametrize("policy", ["full", "keyformer"])
def test_compiled_step_equals_the_plain_decoder(name, policy):
    """The compiled decoder hands q, k and v to the fused caches as column slices of the QKV product and lets the
    kernel rotate them (GPT-J's interleaved pairs on part of each head, Llama's halves and shared KV heads) or add
    ALiBi's bias (MPT), or neither (Cerebras-GPT's learned
    positions): two steps give the plain decoder's logits, cache and scores (uncompiled here, fp32)."""
    import dataclasses

    from kfsim.workload import get_workload
    from measure.compiled import CompiledDecoder, fuse_caches
    from measure.decoder import build, slopes_of

    w = get_workload(name)
    heads, kv = (4, 2) if w.n_kv_heads < w.n_heads else (4, 4)
    w = dataclasses.replace(w, n_layers=2, d_model=64, n_heads=heads, n_kv_heads=kv, head_dim=16, ffn_dim=96,
                            vocab_size=101, max_context=128, rotary_dim=8 if w.family == "gptj" else None)
    torch.manual_seed(0)
    model = build(w, dtype=torch.float32, device=DEVICE)

    def caches(slopes):
        torch.manual_seed(1)
        if policy == "full":
            out = [FullCache(2, kv, 48, 16, torch.float32, DEVICE, alibi_slopes=slopes) for _ in range(w.n_layers)]
        else:
            out = [EvictingCache("keyformer", 2, kv, 40, 10, 16, torch.float32, DEVICE) for _ in range(w.n_layers)]
        for c in out:
            c.fill_random(40 if policy == "full" else 80)
            c.steady = False
            if policy == "keyformer":
                c.noise = lambda like: torch.zeros_like(like)
        return out

    plain = caches(slopes_of(w))
    held = caches(None)
    fused = fuse_caches(held, slopes=slopes_of(w))
    for c in fused:
        if policy == "keyformer":
            c.noise_tensor = torch.zeros(2 * heads * c.plain.slots, device=DEVICE)
    compiled = CompiledDecoder(model, compile=False)
    token = torch.tensor([3, 7], device=DEVICE)
    with torch.no_grad():
        for i in range(2):
            want, got = model.decode(token, 40 + i, plain), compiled.decode(token, 40 + i, fused)
            assert torch.allclose(want, got, atol=1e-4, rtol=1e-4), (want - got).abs().max()
            for c in fused:
                if policy == "keyformer":
                    c.sync()
    for x, y in zip(plain, held):
        # the second step's inputs differ by the first's rounding (rotary in the kernel's order of operations)
        assert torch.allclose(x.k, y.k, atol=1e-5) and torch.allclose(x.v, y.v, atol=1e-5)
        if policy == "keyformer":
            assert torch.allclose(x.score, y.score, atol=1e-5) and torch.equal(x.pos, y.pos.long())
