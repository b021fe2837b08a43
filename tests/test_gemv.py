"""The batch-1 Triton matrix-vector kernels against the same products in PyTorch (fp32 reference on bf16 inputs).

On a CUDA GPU the compiled kernels run; without one, Triton's interpreter runs them on the CPU at small sizes.
"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")


def _interpreter_loop_bounds_as_int():
    """Triton 3.6's interpreter turns a runtime loop bound into int via int(1-element array), which NumPy >= 2.4
    refuses ("only 0-dimensional arrays can be converted"); gemv's loops over K hit it. Take the element instead.
    CPU interpreter only: compiled kernels on a GPU never see this."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor
    if getattr(patch, "kfsim_index_fix", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.kfsim_index_fix = True
    interpreter._patch_lang_tensor = patched


if not torch.cuda.is_available():
    _interpreter_loop_bounds_as_int()

import torch.nn.functional as F  # noqa: E402

from measure.gemv import gemv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (rows, width): small on the CPU interpreter; a GPT-J-sized width on the GPU
SHAPES = [(64, 256)] + ([(512, 4096), (96, 1024)] if DEVICE == "cuda" else [])


def _rand(*shape, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(torch.bfloat16)


def _close(got, want):
    # bf16 output: 2^-8 relative, plus the sums' fp32 order
    assert torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2), (got.float() - want.float()).abs().max()


def _norm(x, kind, w, b):
    x = x.float()
    if kind == "layernorm":
        return F.layer_norm(x, x.shape, w.float(), b.float(), 1e-5).to(torch.bfloat16).float()
    return F.rms_norm(x, x.shape, w.float(), 1e-5).to(torch.bfloat16).float()


@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("norm", [None, "layernorm", "rmsnorm"])
def test_single_matrix_with_norm_bias_residual(n, k, norm):
    torch.manual_seed(0)
    x, w, bias, res = _rand(k), _rand(n, k, scale=k ** -0.5), _rand(n), _rand(n)
    nw, nb = _rand(k), _rand(k)
    xin = x.float() if norm is None else _norm(x, norm, nw, nb)
    want = (w.float() @ xin + bias.float()).to(torch.bfloat16).float() + res.float()
    got = gemv(x, w, bias=bias, residual=res, norm=norm, norm_weight=nw, norm_bias=nb if norm == "layernorm" else None)
    _close(got, want)


@pytest.mark.parametrize("n, k", SHAPES)
def test_stacked_rows_activation_on_second(n, k):
    """GPT-J's QKV and MLP-up: one layernorm, two matrices, GELU on the second's rows only."""
    torch.manual_seed(1)
    x, w1, w2 = _rand(k), _rand(n, k, scale=k ** -0.5), _rand(2 * n, k, scale=k ** -0.5)
    nw, nb, bias = _rand(k), _rand(k), _rand(3 * n)
    xin = _norm(x, "layernorm", nw, nb)
    y = torch.cat([w1.float() @ xin, w2.float() @ xin]) + bias.float()
    want = torch.cat([y[:n], F.gelu(y[n:], approximate="tanh")])
    got = gemv(x, w1, w2=w2, stack="rows", bias=bias, norm="layernorm", norm_weight=nw, norm_bias=nb,
               act="gelu_tanh", act_from=n)
    _close(got, want)


@pytest.mark.parametrize("n, k", SHAPES)
def test_stacked_columns_with_residual(n, k):
    """GPT-J's output and MLP-down projections summed into the residual."""
    torch.manual_seed(2)
    x1, x2 = _rand(k), _rand(4 * k)
    w1, w2 = _rand(n, k, scale=k ** -0.5), _rand(n, 4 * k, scale=(4 * k) ** -0.5)
    bias, res = _rand(n), _rand(n)
    want = (w1.float() @ x1.float() + w2.float() @ x2.float() + bias.float()).to(torch.bfloat16).float() + res.float()
    got = gemv(x1, w1, w2=w2, x2=x2, stack="cols", bias=bias, residual=res)
    _close(got, want)


@pytest.mark.parametrize("n, k", SHAPES)
def test_gated_rows(n, k):
    """Llama's SwiGLU: silu(gate) * up from one [2F, K] matrix, after RMSNorm."""
    torch.manual_seed(3)
    x, w, nw = _rand(k), _rand(2 * n, k, scale=k ** -0.5), _rand(k)
    h = (w.float() @ _norm(x, "rmsnorm", nw, None)).to(torch.bfloat16).float()
    want = F.silu(h[:n]) * h[n:]
    got = gemv(x, w, stack="glu", norm="rmsnorm", norm_weight=nw)
    _close(got, want)


def test_block_must_divide_the_rows():
    x, w = _rand(256), _rand(24, 256)
    with pytest.raises(ValueError, match="does not divide"):
        gemv(x, w, block_n=16)


def _random_norms(model):
    """Norm scales and shifts away from 1 and 0, so folding them has something to do."""
    gen = torch.Generator(device="cpu").manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                if name.endswith("weight"):
                    p.copy_(0.5 + torch.rand(p.shape, generator=gen))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("name", ["gpt-j-6b", "llama-3-8b"])
def test_folding_norms_keeps_the_function(name):
    """fold_norm: the decoder with each norm's scale and shift moved into the products after it (fp32: exact up to
    rounding) gives the same logits; the norms are left at 1 and 0."""
    import copy
    import dataclasses

    from kfsim.workload import get_workload
    from measure.compiled import CompiledDecoder
    from measure.decoder import build, slopes_of
    from measure.kv_policies import FullCache

    w = dataclasses.replace(get_workload(name), n_layers=2, d_model=64, n_heads=4, n_kv_heads=2 if "llama" in name
                            else 4, head_dim=16, ffn_dim=128, vocab_size=96, max_context=64,
                            rotary_dim=8 if "gpt-j" in name else None)
    model = build(w, dtype=torch.float32, device="cpu")
    _random_norms(model)
    reference = copy.deepcopy(model)
    CompiledDecoder(model, compile=False, batch1_gemv=True)  # folds the norms of `model` in place
    norms = [(n, p) for n, p in model.named_parameters() if "norm" in n]
    assert all(bool((p == (1 if n.endswith("weight") else 0)).all()) for n, p in norms)
    prompt = torch.randint(0, w.vocab_size, (2, 10))
    a, b = ([FullCache(2, w.n_kv_heads, 16, w.head_dim, torch.float32, "cpu", slopes_of(w))
             for _ in range(w.n_layers)] for _ in range(2))
    with torch.no_grad():
        assert torch.allclose(reference.prefill(prompt, a), model.prefill(prompt, b), atol=1e-5)
        assert torch.allclose(reference.decode(torch.tensor([3, 7]), 10, a), model.decode(torch.tensor([3, 7]), 10, b),
                              atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name, fused", [("gpt-j-6b", False), ("cerebras-gpt-111m", False), ("mpt-7b", False),
                                         ("llama-3-8b", False), ("gpt-j-6b", True), ("llama-3-8b", True),
                                         ("mpt-7b", True), ("cerebras-gpt-111m", True)])
def test_fused_products_decoder_matches_decoder(name, fused, batch):
    """The compiled engine's fused-product path (norms folded; products and residuals on gemv at batch 1, on
    gemm_small with `small_gemm` at batch 3) gives the logits of the decoder it was built from; with the fused
    attention cache, rotary runs inside the attention kernel (GPT-J's interleaved pairs on part of each head,
    Llama's halves) or ALiBi's bias is added there (MPT, whose fused full cache holds no position columns), the
    kernel reading q, k and v as column slices of the products."""
    import copy
    import dataclasses

    from kfsim.workload import get_workload
    from measure.compiled import CompiledDecoder
    from measure.decoder import build, slopes_of
    from measure.kv_policies import FullCache

    w = get_workload(name)
    heads, kv = (4, 2) if w.n_kv_heads < w.n_heads else (4, 4)
    D = 16 if batch == 1 else 32  # gemm_small's blocks: 32 output rows, inputs in multiples of 128
    w = dataclasses.replace(w, n_layers=2, d_model=4 * D, n_heads=heads, n_kv_heads=kv, head_dim=D, ffn_dim=8 * D,
                            vocab_size=96, max_context=64, rotary_dim=D // 2 if w.family == "gptj" else None)
    model = build(w, dtype=torch.bfloat16, device=DEVICE)
    _random_norms(model)
    reference = copy.deepcopy(model)
    fast = CompiledDecoder(model, compile=False, batch1_gemv=True, small_gemm=True)  # folds the norms into `model`
    assert fast.small_gemm == (batch > 1)  # batch 1's dims do not tile; that decoder uses cuBLAS past batch 1
    caches = [[FullCache(batch, w.n_kv_heads, 16, w.head_dim, torch.bfloat16, DEVICE,
                         None if fused and i == 1 else slopes_of(w)) for _ in range(w.n_layers)]
              for i in range(2)]
    if fused:
        if DEVICE != "cuda":
            pytest.skip("the attention kernel's bf16 path needs a GPU (Triton's CPU interpreter gets bf16 dots "
                        "wrong); test_fused_attention checks its rotary in fp32 on the CPU")
        from measure.fused_attention import FusedFullCache

        caches[1] = [FusedFullCache(c, slopes=slopes_of(w)) for c in caches[1]]
    prompt = torch.randint(0, w.vocab_size, (batch, 10), device=DEVICE)
    with torch.no_grad():
        for c in caches:
            model.prefill(prompt, c)
        token = torch.arange(3, 3 + batch, device=DEVICE)
        for i in range(3):
            want = reference.decode(token, 10 + i, caches[0]).float()
            got = fast.decode(token, 10 + i, caches[1]).float()
            assert got.shape == want.shape == (batch, w.vocab_size)
            # bf16 rounding in a different order: errors of a few bf16 steps of the largest logit (1-1.5 % seen)
            assert (got - want).abs().max() <= 0.03 * want.abs().max(), (got - want).abs().max()


ROWS = [3, 16, 40]  # batch sizes: padded to 16, exactly 16, padded to 64


def _bare_norm(x, kind):
    """The norm without scale or shift, row by row, in fp32 (small_gemm applies it to the sums unrounded)."""
    x = x.float()
    if kind == "layernorm":
        return F.layer_norm(x, x.shape[-1:], eps=1e-5)
    if kind == "rmsnorm":
        return F.rms_norm(x, x.shape[-1:], eps=1e-5)
    return x


@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("norm", [None, "layernorm", "rmsnorm"])
def test_small_gemm_one_matrix_with_norm_bias_residual(M, norm):
    from measure.gemm_small import small_gemm

    torch.manual_seed(M)
    x, w, bias, res = _rand(M, 512), _rand(96, 512, scale=512 ** -0.5), _rand(96), _rand(M, 96)
    want = (_bare_norm(x, norm) @ w.float().T + bias.float()).to(torch.bfloat16).float() + res.float()
    got = small_gemm(x, w, bias=bias, residual=res, norm=norm, row_sums=w.float().sum(1))
    assert got.shape == (M, 96) and got.dtype == torch.bfloat16
    _close(got, want)


@pytest.mark.parametrize("M", ROWS)
def test_small_gemm_stacked_rows_activation_on_second(M):
    """GPT-J's QKV and MLP-up at batch M: one layernorm, two matrices, GELU on the second's columns only."""
    from measure.gemm_small import small_gemm

    torch.manual_seed(1)
    x, w1, w2, bias = _rand(M, 256), _rand(64, 256, scale=1 / 16), _rand(128, 256, scale=1 / 16), _rand(192)
    y = _bare_norm(x, "layernorm") @ torch.cat([w1, w2]).float().T + bias.float()
    want = torch.cat([y[:, :64], F.gelu(y[:, 64:], approximate="tanh")], dim=1)
    got = small_gemm(x, w1, w2=w2, stack="rows", bias=bias, norm="layernorm", act="gelu_tanh", act_from=64,
                     row_sums=torch.cat([w1, w2]).float().sum(1))
    _close(got, want)


@pytest.mark.parametrize("M", ROWS)
def test_small_gemm_stacked_columns_from_a_strided_view(M):
    """GPT-J's output and MLP-down projections into the residual; the MLP input is a column slice of the first
    kernel's output (rows further apart than its width)."""
    from measure.gemm_small import small_gemm

    torch.manual_seed(2)
    x1, wide = _rand(M, 256), _rand(M, 64 + 1024)
    x2 = wide[:, 64:]
    w1, w2, bias, res = _rand(64, 256, scale=1 / 16), _rand(64, 1024, scale=1 / 32), _rand(64), _rand(M, 64)
    want = (x1.float() @ w1.float().T + x2.float() @ w2.float().T + bias.float()).to(torch.bfloat16).float()
    got = small_gemm(x1, w1, w2=w2, x2=x2, stack="cols", bias=bias, residual=res)
    _close(got, want + res.float())


@pytest.mark.parametrize("M", ROWS)
def test_small_gemm_gated_rows(M):
    """Llama's SwiGLU at batch M: silu(gate) * up from one [2F, K] matrix, after RMSNorm."""
    from measure.gemm_small import small_gemm

    torch.manual_seed(3)
    x, w = _rand(M, 256), _rand(2 * 64, 256, scale=1 / 16)
    h = (_bare_norm(x, "rmsnorm") @ w.float().T).to(torch.bfloat16).float()
    _close(small_gemm(x, w, stack="glu", norm="rmsnorm"), F.silu(h[:, :64]) * h[:, 64:])


def test_small_gemm_refuses_what_it_cannot_tile():
    from measure.gemm_small import small_gemm

    with pytest.raises(ValueError, match="65 rows, expected 1 to 64"):
        small_gemm(_rand(65, 64), _rand(32, 64))
    with pytest.raises(ValueError, match="blocks of 32 rows do not divide the 48 output rows"):
        small_gemm(_rand(2, 64), _rand(48, 64))
    with pytest.raises(ValueError, match="needs the rows' sums"):
        small_gemm(_rand(2, 64), _rand(32, 64), norm="layernorm")
